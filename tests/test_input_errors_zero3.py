"""Issue 19: ``patch_model`` on a model whose parameters DeepSpeed ZeRO-3 partitioned.

HF ``Trainer`` with a stage-3 config loads the model under ``deepspeed.zero.Init``
(``HfDeepSpeedConfig`` is what ``TrainingArguments`` creates for it): every parameter's local
tensor is empty, and ``patch_model`` used to fail copying them (``The size of tensor a (2048)
must match the size of tensor b (0)``). It now gathers each layer's projections and builds the
new layer, whose parameters ``deepspeed.initialize`` partitions again. Checked on 2 gloo
processes, each with its own batch, against one process running the same checkpoint with eager
attention and no DeepSpeed: the new parameters are partitioned after ``deepspeed.initialize``
(each rank holds half), the logits equal eager's per element, the
full gradients of the swapped layers equal the average of eager's over both batches, and an SGD
step moves the weights by exactly that; ``qkv_groups=2`` gives the logits it gives without
DeepSpeed. HF ``Trainer`` with a ZeRO-3 config trains the patched
model; the attention-interface path (no module swapped) equals eager under ZeRO-3 as it is; and
patching after ``deepspeed.initialize`` is refused by name.
"""

import json
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402

LR = 0.5
WORKER = r'''
import json, os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
import torch
import deepspeed
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from sft_kernels.integrations import transformers as sft_tf

torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo")
RANK, WORLD = dist.get_rank(), dist.get_world_size()
pretrained, out_dir, lr = sys.argv[1], sys.argv[2], float(sys.argv[3])
B, L, VOCAB = 2, 12, 50


def batch(r):
    g = torch.Generator().manual_seed(10 + r)
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3 + r] = 0  # left padding, different per rank
    weights = torch.randn(B, L, VOCAB, generator=g)
    return ids, mask, weights


def objective(logits, mask, weights):
    return (logits * weights * mask[..., None]).sum()


# the oracle first (before HfDeepSpeedConfig exists): eager, no DeepSpeed, both ranks' batches
ref = AutoModelForCausalLM.from_pretrained(pretrained, attn_implementation="eager", dtype=torch.float32)
ref_logits = {}
for r in range(WORLD):
    ids, mask, w = batch(r)
    logits = ref(input_ids=ids, attention_mask=mask).logits
    (objective(logits, mask, w) / WORLD).backward()  # DeepSpeed averages the ranks' gradients
    ref_logits[r] = logits.detach()
ref_params = {n: p.detach().clone() for n, p in ref.named_parameters()}
# qkv_groups=2 (block-diagonal projections, a different model): patched without DeepSpeed as the oracle
grouped = sft_tf.patch_model(AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32), qkv_groups=2)
with torch.no_grad():
    grouped_logits = grouped(input_ids=batch(RANK)[0], attention_mask=batch(RANK)[1]).logits
ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

ds_config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "zero_allow_untested_optimizer": True,
             "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 by default: the step would not be -lr * grad
hf_ds = HfDeepSpeedConfig(ds_config)  # what TrainingArguments(deepspeed=...) creates: from_pretrained partitions
model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32)
out = {"loaded_partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())}
sft_tf.patch_model(model)
attn = {n: p for n, p in model.named_parameters() if ".self_attn." in n}
out["others_still_partitioned"] = all(p.numel() == 0 for n, p in model.named_parameters() if n not in attn)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), config=ds_config)
out["patched_partitioned"] = all(hasattr(p, "ds_id") and p.numel() == 0 for p in attn.values())
out["held_fraction"] = sum(p.ds_tensor.numel() for p in attn.values()) / sum(p.ds_numel for p in attn.values())

ids, mask, w = batch(RANK)
logits = engine(input_ids=ids, attention_mask=mask).logits
real = mask.bool()
out["logits"] = float((logits.detach()[real] - ref_logits[RANK][real]).norm() / ref_logits[RANK][real].norm())
engine.backward(objective(logits, mask, w))


def dense(name, tensors):
    """The eager model's q/k/v/o tensors in the patched layer's layout (qkv_proj = cat of flat q, k, v)."""
    prefix, _, rest = name.partition(".self_attn.attn.")
    part = rest.rsplit(".", 1)[-1]
    if rest.startswith("qkv_proj"):
        return torch.cat([tensors[f"{prefix}.self_attn.{p}_proj.{part}"].reshape(-1) for p in "qkv"])
    return tensors[f"{prefix}.self_attn.o_proj.{part}"]


def rel(a, b):
    return float((a - b).norm() / b.norm())


out["grads"] = {n: rel(safe_get_full_grad(p), dense(n, ref_grads)) for n, p in attn.items()}
engine.step()
stepped = {}
for n, p in attn.items():
    with deepspeed.zero.GatheredParameters([p]):
        expected = dense(n, ref_params) - lr * dense(n, ref_grads)
        stepped[n] = rel(p.detach().reshape(expected.shape), expected)
out["stepped"] = stepped
try:
    sft_tf.patch_model(engine.module)
    out["after_initialize"] = "no error"
except ValueError as exc:
    out["after_initialize"] = str(exc)

# qkv_groups=2 on a partitioned model: the diagonal blocks of the gathered projections
grouped = sft_tf.patch_model(AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32), qkv_groups=2)
grouped_engine, *_ = deepspeed.initialize(model=grouped, optimizer=torch.optim.SGD(grouped.parameters(), lr=lr),
                                          config=ds_config)
with torch.no_grad():
    logits = grouped_engine(input_ids=ids, attention_mask=mask).logits
out["grouped_logits"] = float((logits[real] - grouped_logits[real]).norm() / grouped_logits[real].norm())

# the attention-interface path swaps no module: a partitioned model needs nothing
sft_tf.register()
iface = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32, attn_implementation="sft_sliding_window")
iface_engine, *_ = deepspeed.initialize(model=iface, optimizer=torch.optim.SGD(iface.parameters(), lr=lr),
                                        config=ds_config)
iface_logits = iface_engine(input_ids=ids, attention_mask=mask).logits.detach()
out["interface_logits"] = float((iface_logits[real] - ref_logits[RANK][real]).norm() / ref_logits[RANK][real].norm())

# the issue's own path: HF Trainer with a ZeRO-3 config (TrainingArguments creates the DeepSpeed
# config, from_pretrained loads partitioned, Trainer.train() runs deepspeed.initialize)
from transformers import Trainer, TrainingArguments

args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), use_cpu=True, per_device_train_batch_size=B,
                         max_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                         deepspeed={**ds_config, "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"})
model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32)
sft_tf.patch_model(model)
data = [{"input_ids": batch(i)[0][0], "labels": batch(i)[0][0]} for i in range(8)]
trainer = Trainer(model=model, args=args, train_dataset=data,
                  optimizers=(torch.optim.SGD(model.parameters(), lr=1e-3), None))
result = trainer.train()
out["trainer_steps"] = result.global_step
out["trainer_loss"] = result.training_loss
out["trainer_attention"] = type(trainer.model_wrapped.module.model.layers[0].self_attn).__name__
json.dump(out, open(os.path.join(out_dir, f"rank{RANK}.json"), "w"))
dist.barrier()
os._exit(0)  # no interpreter finalisation with deepspeed's communication state (as sft_kernels.train does)
'''


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tmp = tmp_path_factory.mktemp("zero3patch")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, use_cache=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "pretrained")
    (tmp / "worker.py").write_text(WORKER)
    prebuild_deepspeed_cpu_ops()
    g = Group([[sys.executable, str(tmp / "worker.py"), str(tmp / "pretrained"), str(tmp), str(LR)]] * 2,
              rank_envs(2, free_port()))
    assert g.wait() == [0, 0], g.report()
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_patched_layers_are_partitioned_again(ranks):
    for r in ranks:
        assert r["loaded_partitioned"] and r["others_still_partitioned"] and r["patched_partitioned"], r
        assert 0.45 < r["held_fraction"] < 0.55, r  # world size 2: each rank holds half


def test_forward_gradients_and_step_equal_eager(ranks):
    for i, r in enumerate(ranks):
        assert r["logits"] < 1e-5, (i, r["logits"])
        assert len(r["grads"]) == 2 * 4, r["grads"]  # 2 layers: qkv weight and bias, o_proj weight and bias
        bad = {n: e for n, e in {**r["grads"], **{"step " + n: e for n, e in r["stepped"].items()}}.items()
               if not e < 1e-5}
        assert not bad, (i, bad)


def test_block_diagonal_patch_under_zero3_equals_it_without(ranks):
    for i, r in enumerate(ranks):
        assert r["grouped_logits"] < 1e-5, (i, r["grouped_logits"])


def test_attention_interface_needs_no_swap_under_zero3(ranks):
    for i, r in enumerate(ranks):
        assert r["interface_logits"] < 1e-5, (i, r["interface_logits"])


def test_trainer_with_zero3_trains_the_patched_model(ranks):
    for r in ranks:
        assert r["trainer_steps"] == 2 and r["trainer_attention"] == "SFTAttentionHF", r
        assert 0 < r["trainer_loss"] < 10, r  # cross-entropy over 50 tokens starts near log(50) = 3.9


def test_patching_after_initialize_names_the_alternatives(ranks):
    for r in ranks:
        msg = r["after_initialize"]
        assert msg.startswith("patch_model: the model is already wrapped by deepspeed.initialize"), msg
        assert "attn_implementation='sft_sliding_window'" in msg, msg
