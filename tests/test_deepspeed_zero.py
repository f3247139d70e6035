"""A small model built from BlockDiagonalLinear and SFTAttention trains under
deepspeed.initialize on CPU (gloo, one process) at ZeRO stages 0-3, fp32 and bf16: loss
falls, no NaN, and a DeepSpeed checkpoint saved and loaded resumes with identical
parameters and an identical next-step loss.

Each configuration runs in a fresh interpreter (DeepSpeed keeps process-wide state:
the communication backend, ZeRO-3's parameter hooks), two at a time on the two cores,
waited on for as long as it makes progress (tests/_procs.py). DeepSpeed's one-time CPU op
build happens before, untimed.

ZeRO-3 partitioned loading (``sft-kernels train``'s build_model) is checked on 2 ranks:
each rank's parameter storage right after loading is half the model, the peak memory of
building it stays well under the full model's size (a ZeRO-2 build, which materialises
the whole model, is the control that shows the measurement can fail), and a partitioned
``from_pretrained`` holds exactly the saved weights.
"""

import json
import os
import sys

import pytest

pytest.importorskip("deepspeed")

from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16  # steps before the checkpoint

WORKER = r'''
import json, os, sys
device = sys.argv[6]
os.environ["DS_ACCELERATOR"] = device  # before deepspeed is imported
import torch
import torch.nn as nn
import deepspeed
from sft_kernels import BlockDiagonalLinear, SFTAttention

stage, dtype_name, ckpt_dir, out_path, steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
VOCAB, C, L, B = 32, 32, 24, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1 = nn.LayerNorm(C)
        self.attn = SFTAttention(C, num_heads=4, num_kv_heads=2, window_size=8, qkv_groups=2, bias=True)
        self.n2 = nn.LayerNorm(C)
        # block-diagonal MLP: 4 independent 8 -> 16 blocks up, 4 independent 16 -> 8 blocks down
        self.up = BlockDiagonalLinear([8] * 4, [16] * 4)
        self.down = BlockDiagonalLinear([16] * 4, [8] * 4)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.down(torch.nn.functional.gelu(self.up(self.n2(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, C)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(C, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(x).float()
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def batch(step):
    # periodic sequences (period 3..6 from a random start): learnable within the window of 8
    g = torch.Generator().manual_seed(1000 + step)
    period = torch.randint(3, 7, (B, 1), generator=g)
    start = torch.randint(0, VOCAB, (B, 1), generator=g)
    pos = torch.arange(L).unsqueeze(0)
    return (start + (pos % period) * 5) % VOCAB


def engine(seed):
    torch.manual_seed(seed)
    model = TinyLM()
    config = {
        "train_micro_batch_size_per_gpu": B,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if dtype_name == "bf16":
        config["bf16"] = {"enabled": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return eng


def train_step(eng, step):
    loss = eng(batch(step).to(eng.device))
    eng.backward(loss)
    eng.step()
    return float(loss)


def full_params(eng):
    out = {}
    for n, p in eng.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[n] = p.detach().clone().float()
    return out


a = engine(seed=0)
param_dtype = str(next(a.module.parameters()).dtype)
losses = [train_step(a, s) for s in range(steps)]
a.save_checkpoint(ckpt_dir, tag="ckpt")
saved = full_params(a)
next_a = train_step(a, steps)

b = engine(seed=123)  # different initial weights: everything must come from the checkpoint
before = full_params(b)
b.load_checkpoint(ckpt_dir, tag="ckpt")
loaded = full_params(b)
next_b = train_step(b, steps)
after_a, after_b = full_params(a), full_params(b)
json.dump({
    "losses": losses, "next_a": next_a, "next_b": next_b, "param_dtype": param_dtype,
    "n_params": len(saved),
    "init_differed": any(not torch.equal(before[n], saved[n]) for n in saved),
    "loaded_equal": [n for n in saved if not torch.equal(loaded[n], saved[n])],
    "after_step_equal": [n for n in saved if not torch.equal(after_a[n], after_b[n])],
    "finite": all(bool(torch.isfinite(v).all()) for v in after_a.values()),
}, open(out_path, "w"))
from sft_kernels.train.loop import exit_process  # noqa: E402
exit_process(0)  # the process group, then no interpreter finalisation (exit_process says why)
'''

CONFIGS = [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16")]
IDS = [f"zero{s}-{d}" for s, d in CONFIGS]


def _launch(tmp, cid, stage, dtype, device="cpu"):
    """One worker (world size 1) as a _procs.Group: waited on while it makes progress."""
    env = rank_envs(1, free_port())[0]
    env["DS_ACCELERATOR"] = device
    out = tmp / f"{cid}.json"
    cmd = [sys.executable, str(tmp / "worker.py"), str(stage), dtype, str(tmp / f"ckpt-{cid}"), str(out), str(STEPS),
           device]
    return out, Group([cmd], [env])


def _collect(out, group):
    rc = group.wait()[0]
    return json.loads(out.read_text()) if rc == 0 else group.report(6000)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """Run every configuration, two processes at a time; {config id: result dict or error log}."""
    prebuild_deepspeed_cpu_ops()
    tmp = tmp_path_factory.mktemp("zero")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    results = {}
    pending = list(zip(IDS, CONFIGS))
    while pending:
        running = []
        for cid, (stage, dt) in pending[:2]:
            running.append((cid, *_launch(tmp, cid, stage, dt)))
        pending = pending[2:]
        for cid, out, g in running:
            results[cid] = _collect(out, g)
    return results


@pytest.fixture()
def run(zero_runs, request):
    r = zero_runs[request.node.callspec.params["cid"]]
    assert isinstance(r, dict), f"the training process failed:\n{r}"
    return r


@pytest.mark.parametrize("cid", IDS, ids=IDS)
def test_trains(run, cid):
    losses = run["losses"]
    assert all(l == l and abs(l) != float("inf") for l in losses), losses
    assert run["finite"]
    # loss falls: the mean of the last 3 steps is well below the first step's loss
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    assert run["param_dtype"] == ("torch.bfloat16" if cid.endswith("bf16") else "torch.float32")


@pytest.mark.parametrize("cid", IDS, ids=IDS)
def test_checkpoint_resumes_exactly(run, cid):
    assert run["n_params"] > 10
    assert run["init_differed"]  # the second engine started elsewhere
    assert run["loaded_equal"] == [], f"parameters differ after load_checkpoint: {run['loaded_equal']}"
    assert run["next_b"] == run["next_a"]
    assert run["after_step_equal"] == [], f"parameters differ after the resumed step: {run['after_step_equal']}"


@pytest.mark.gpu
def test_zero2_bf16_on_gpu(tmp_path):
    """The same model and checks on a GPU (nccl, Triton kernels through backend="auto")."""
    (tmp_path / "worker.py").write_text(WORKER)
    r = _collect(*_launch(tmp_path, "gpu-zero2-bf16", 2, "bf16", device="cuda"))
    assert isinstance(r, dict), f"the training process failed:\n{r}"
    assert r["finite"] and sum(r["losses"][-3:]) / 3 < 0.8 * r["losses"][0], r["losses"]
    assert r["loaded_equal"] == [] and r["next_b"] == r["next_a"]


# ----------------------------------------------------------------------------- ZeRO-3 partitioned loading
LOAD_WORKER = r'''
import gc, json, os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
import torch
import deepspeed
from sft_kernels.train import build_parser
from sft_kernels.train import model as model_mod
from sft_kernels.train.loop import ds_config, local_parameter_bytes
from sft_kernels.train.tokenizer import load_tokenizer

torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
pretrained_dir, out_dir = sys.argv[1], sys.argv[2]


def peak_rss_reset():
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (the peak resident set size)
        f.write("5")


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


def build(stage, flags):
    args = build_parser().parse_args(["--zero_stage", str(stage), *flags])
    tok = load_tokenizer(args.model_name_or_path)
    gc.collect()
    peak_rss_reset()
    rss0 = status("VmRSS")
    model = model_mod.build_model(args, tok, ds_config=ds_config(args, world))
    delta = status("VmHWM") - rss0
    full = sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * 4 for p in model.parameters())
    return model, {"peak_delta": delta, "full_bytes": full, "held_bytes": local_parameter_bytes(model),
                   "partitioned": all(hasattr(p, "ds_id") and p.data.numel() == 0 for p in model.parameters())}


out = {}
# a 52M-parameter embedded model (208 MB in fp32), built at random: large next to the interpreter's own memory
big = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
           num_key_value_heads=4, head_dim=64)
saved = dict(model_mod.DEFAULT_MODEL)
model_mod.DEFAULT_MODEL.update(big)
for stage in (2, 3):
    m, out[f"config_zero{stage}"] = build(stage, [])
    del m
    gc.collect()
model_mod.DEFAULT_MODEL.clear()
model_mod.DEFAULT_MODEL.update(saved)
# from_pretrained under ZeRO-3: partitioned, and holding exactly the saved weights
m, out["pretrained_zero3"] = build(3, ["--model_name_or_path", pretrained_dir])
from safetensors.torch import load_file
ref = load_file(os.path.join(pretrained_dir, "model.safetensors"))
wrong = []
for name, p in m.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        if name in ref and not torch.equal(p.detach().float(), ref[name].float()):
            wrong.append(name)
out["pretrained_zero3"]["wrong"] = wrong
out["pretrained_zero3"]["checked"] = sum(n in ref for n, _ in m.named_parameters())
json.dump(out, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
from sft_kernels.train.loop import exit_process  # noqa: E402
exit_process(0)  # the process group, then no interpreter finalisation (exit_process says why)
'''


@pytest.fixture(scope="module")
def zero3_load(tmp_path_factory):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM

    from sft_kernels.train.model import default_config
    from sft_kernels.train.tokenizer import ByteTokenizer

    tmp = tmp_path_factory.mktemp("zero3load")
    tok = ByteTokenizer()
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(default_config(len(tok), 32, 0, 2, 1))
    model.save_pretrained(tmp / "pretrained")
    tok.save_pretrained(tmp / "pretrained")
    (tmp / "worker.py").write_text(LOAD_WORKER)
    prebuild_deepspeed_cpu_ops()
    # glibc keeps freed heap memory mapped (and raises its mmap threshold as large blocks are
    # freed), so RSS would count every tensor ever allocated; a fixed 64 KiB threshold serves
    # each large tensor from its own mapping, returned on free: the peak RSS is then the peak of
    # live memory
    g = Group([[sys.executable, str(tmp / "worker.py"), str(tmp / "pretrained"), str(tmp)]] * 2,
              rank_envs(2, free_port(), extra={"MALLOC_MMAP_THRESHOLD_": "65536"}))
    assert g.wait() == [0, 0], g.report()
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("rank", [0, 1])
def test_zero3_loads_partitioned(zero3_load, rank):
    r = zero3_load[rank]
    z3, z2 = r["config_zero3"], r["config_zero2"]
    full = z3["full_bytes"]
    assert full > 150e6 and z2["full_bytes"] == full
    assert z3["partitioned"] and not z2["partitioned"]
    assert 0.45 < z3["held_bytes"] / full < 0.55, z3  # world size 2: half of every parameter
    assert z2["held_bytes"] == full
    # the control materialises the whole model on the rank; the partitioned build never does
    assert z2["peak_delta"] > 0.95 * full, z2
    assert z3["peak_delta"] < 0.75 * full, z3
    pre = r["pretrained_zero3"]
    assert pre["partitioned"] and 0.4 < pre["held_bytes"] / pre["full_bytes"] < 0.6, pre
    assert pre["checked"] > 10 and pre["wrong"] == [], pre
