"""A small model built from BlockDiagonalLinear and SFTAttention trains under
deepspeed.initialize on CPU (gloo, one process) at ZeRO stages 0-3, fp32 and bf16: loss
falls, no NaN, and a DeepSpeed checkpoint saved and loaded resumes with identical
parameters and an identical next-step loss.

Each configuration runs in a fresh interpreter (DeepSpeed keeps process-wide state:
the communication backend, ZeRO-3's parameter hooks), two at a time on the two cores.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

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
'''

CONFIGS = [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16")]
IDS = [f"zero{s}-{d}" for s, d in CONFIGS]


def _launch(tmp, cid, stage, dtype, device="cpu"):
    env = dict(os.environ, PYTHONPATH=ROOT, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), DS_ACCELERATOR=device, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = tmp / f"{cid}.json"
    cmd = [sys.executable, str(tmp / "worker.py"), str(stage), dtype, str(tmp / f"ckpt-{cid}"), str(out), str(STEPS),
           device]
    return out, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _collect(out, p):
    try:
        log = p.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        p.kill()
        log = p.communicate()[0] + "\n(timed out)"
    return json.loads(out.read_text()) if p.returncode == 0 else log[-6000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """Run every configuration, two processes at a time; {config id: result dict or error log}."""
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
        for cid, out, p in running:
            results[cid] = _collect(out, p)
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
