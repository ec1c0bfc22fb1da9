"""The single-process optimizer path against plain torch and closed forms, independently of the parity tests
(which compare layouts with the single-process run, so a bug there passes them all).

- the schedule (``trainer/optim.py``, ``optim.*`` in ``trainer/config.py``): linear warmup to the peak lr
  over ``warmup_steps`` steps (the first step at lr/warmup), then a half cosine from the peak down to
  ``lr * min_lr_ratio`` at step ``train.steps``, flat after;
- weight decay on matrices (embeddings and projections) only, not on norm weights or biases;
- clipping scales the gradients by ``grad_clip / norm`` when the global norm is above ``grad_clip``;
- the real Trainer, a few steps in one process, against a hand-written loop with ``torch.optim.AdamW``.
"""
import math

import pytest
import torch

from conftest import run_ranks

from loomtrain.trainer.config import OptimConfig
from loomtrain.trainer.optim import build_optimizer, build_scheduler


def closed_form_lr(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """The documented schedule at 0-based optimizer step ``step``, written out here."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)  # 0 at the end of warmup, 1 at ``total``
    floor = peak * min_ratio
    return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2


def scheduled_lrs(cfg: OptimConfig, total: int, steps: int) -> list[float]:
    """The lr each of the first ``steps`` optimizer steps runs with, from the real builders."""
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedule_values_written_out():
    """lr=1, warmup 4, 12 steps, floor 0.1: the values by hand (cos of 0, pi/8, ..., pi; then flat)."""
    c = [1.0, 0.9619397662556434, 0.8535533905932737, 0.6913417161825449, 0.5, 0.3086582838174551,
         0.1464466094067262, 0.0380602337443566, 0.0]  # (1 + cos(k pi / 8)) / 2
    want = [0.25, 0.5, 0.75, 1.0] + [0.1 + 0.9 * x for x in c] + [0.1, 0.1]
    got = scheduled_lrs(OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1), total=12, steps=15)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("peak, warmup, total, min_ratio", [
    (3e-3, 10, 100, 0.1), (1e-3, 2, 6, 0.0), (5e-4, 1, 7, 0.5), (2e-3, 0, 9, 0.1), (1e-3, 3, 4, 0.2)])
def test_schedule_matches_closed_form(peak, warmup, total, min_ratio):
    """Every step of a run (and a few past its end) against :func:`closed_form_lr`; landmarks: the first
    step at peak/warmup (peak without warmup), the last warmup step and the one after it at the peak."""
    cfg = OptimConfig(lr=peak, warmup_steps=warmup, min_lr_ratio=min_ratio)
    got = scheduled_lrs(cfg, total, total + 3)
    assert got == pytest.approx([closed_form_lr(s, peak, warmup, total, min_ratio) for s in range(total + 3)],
                                rel=1e-12, abs=1e-15)
    assert got[0] == pytest.approx(peak / warmup if warmup else peak, rel=1e-12)
    if warmup and total > warmup:
        assert got[warmup - 1] == got[warmup] == pytest.approx(peak, rel=1e-12)
    assert got[total:] == pytest.approx([peak * min_ratio] * 3, rel=1e-12, abs=1e-15)


def _with_biases() -> torch.nn.Module:
    """Embedding, biased linears, a LayerNorm and an RMSNorm: every kind of parameter the rule must sort."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"emb": torch.nn.Embedding(11, 8), "proj": torch.nn.Linear(8, 8),
                                    "ln": torch.nn.LayerNorm(8), "rms_norm": torch.nn.RMSNorm(8),
                                    "out": torch.nn.Linear(8, 11, bias=True)})


def _llama() -> torch.nn.Module:
    from loomtrain.trainer.models.llama.model import ModelArgs, Transformer

    args = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, max_seq_len=8, ffn_hidden=32)
    model = Transformer(args)
    model.init_weights(0)
    return model


# Decayed: embeddings and projection weights. Not decayed: norm weights, biases (written out by name).
NO_DECAY = {
    "with_biases": {"proj.bias", "ln.weight", "ln.bias", "rms_norm.weight", "out.bias"},
    "llama": {"norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")},
}
MODELS = {"with_biases": _with_biases, "llama": _llama}


@pytest.mark.parametrize("kind", MODELS)
def test_weight_decay_groups_by_name(kind):
    """Each parameter sits in exactly one group, with weight_decay 0 iff it is a norm weight or a bias; the
    hyperparameters are the config's."""
    model = MODELS[kind]()
    names = {p: n for n, p in model.named_parameters()}
    assert NO_DECAY[kind] < set(names.values())
    cfg = OptimConfig(weight_decay=0.3, lr=2e-3, beta1=0.8, beta2=0.9, eps=1e-6, fused="false")
    opt = build_optimizer(model.parameters(), cfg, torch.device("cpu"))
    decay_of = {}
    for group in opt.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (2e-3, (0.8, 0.9), 1e-6)
        for p in group["params"]:
            assert names[p] not in decay_of
            decay_of[names[p]] = group["weight_decay"]
    assert decay_of == {n: 0.0 if n in NO_DECAY[kind] else 0.3 for n in names.values()}


@pytest.mark.parametrize("fused", ["false", "auto"])
def test_adamw_steps_equal_torch_adamw(fused):
    """Three steps of the built optimizer and schedule on fixed gradients equal ``torch.optim.AdamW`` with
    the groups written out by hand and the closed-form lr."""
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.5, beta1=0.9, beta2=0.95,
                      eps=1e-8, fused=fused)
    ours, ref = _with_biases(), _with_biases()
    opt = build_optimizer(ours.parameters(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, 3)
    decay = [p for n, p in ref.named_parameters() if n not in NO_DECAY["with_biases"]]
    no_decay = [p for n, p in ref.named_parameters() if n in NO_DECAY["with_biases"]]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.5}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: closed_form_lr(s, 1.0, 2, 3, 0.1))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for (_, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        sched.step()
        ref_opt.step()
        ref_sched.step()
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def _engine(model, clip: float):
    """The FSDP engine of one process (no FSDP: plain modules) around plain SGD (lr 1, no momentum)."""
    from types import SimpleNamespace

    from loomtrain.parallel.engines.fsdp import FSDPEngine

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    dims = SimpleNamespace(grad_averaging_ranks=1, fsdp_enabled=False)
    return FSDPEngine(model, opt, sched, dims, grad_clip=clip, bf16=False, device=torch.device("cpu"))


@pytest.mark.parametrize("clip", [0.5, 100.0, 0.0])
def test_engine_clips_by_global_norm(clip):
    """With SGD at lr 1 the update is the gradient the engine used: ``g * min(1, clip / |g|)`` over all
    parameters together (``grad_clip`` 0: never clipped); the returned norm is the one before clipping."""
    model = _with_biases()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    assert norm > 0.5 and norm < 100.0  # so 0.5 clips and 100 does not
    factor = min(1.0, clip / norm) if clip else 1.0
    got_norm = _engine(model, clip).step()
    assert float(got_norm) == pytest.approx(norm, rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), grads[n] * factor, rtol=1e-5, atol=1e-6, msg=n)
        assert p.grad is None  # cleared for the next step


# ----------------------------------------------------------------------------- the real trainer
STEPS = 5
TRAINER_OPTIM = ["optim.lr=1e-2", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1", "optim.weight_decay=0.5",
                 "optim.grad_clip=0.5", "optim.beta1=0.9", "optim.beta2=0.95", "optim.eps=1e-8",
                 f"train.steps={STEPS}", "train.micro_batch_size=4"]  # 2 micro-batches a step


def _train_recording(rank, overrides):
    """Train in this (forked, single) process; record the initial parameters, every step's micro-batches,
    the lr and weight decay each optimizer step ran with (by parameter name), and the final parameters."""
    from loomtrain.launch.train import run
    from loomtrain.trainer import train as train_mod
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models.llama.model import canonical_name

    rec = {"batches": [], "groups": []}
    fit = train_mod.Trainer.fit

    def recording_fit(self):
        names = {p: canonical_name(n) for n, p in self.model.named_parameters()}
        rec["args"] = self.args
        rec["init"] = {names[p]: p.detach().clone() for p in names}
        next_step = self.batches.next_step

        def recorded_next_step():
            micro = next_step()
            rec["batches"].append([{k: v.clone() for k, v in b.items()} for b in micro])
            return micro

        self.batches.next_step = recorded_next_step
        self.optimizer.register_step_pre_hook(lambda opt, *_: rec["groups"].append(
            [(g["lr"], g["weight_decay"], sorted(names[p] for p in g["params"])) for g in opt.param_groups]))
        result = fit(self)
        rec["final"] = {names[p]: p.detach().clone() for p in names}
        return result

    train_mod.Trainer.fit = recording_fit
    result = run(load_config("tiny", overrides))
    return rec, result.losses, result.grad_norms


def test_trainer_matches_hand_written_adamw_loop(overrides):
    """Five steps of the real Trainer (one process, 2 micro-batches a step, clipping active, decay 0.5) against
    a loop written here from plain torch on the same initial weights and batches: per-token mean cross entropy,
    ``clip_grad_norm_``, ``torch.optim.AdamW`` with groups by name and the closed-form lr. Also: each step ran
    with the closed-form lr and the groups by name."""
    import torch.nn.functional as F

    from loomtrain.trainer.models.llama.model import Transformer

    [(rec, losses, norms)] = run_ranks(_train_recording, 0, overrides + TRAINER_OPTIM)
    assert len(rec["batches"]) == STEPS and all(len(m) == 2 for m in rec["batches"])

    peak, clip = 1e-2, 0.5
    model = Transformer(rec["args"])
    model.load_state_dict(rec["init"])
    names = [n for n, _ in model.named_parameters()]
    no_decay = sorted(n for n in names if n.endswith("norm.weight"))  # attention_norm, ffn_norm, final norm
    decay = sorted(n for n in names if not n.endswith("norm.weight"))
    assert len(no_decay) == 2 * rec["args"].n_layers + 1
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": 0.5},
                             {"params": [params[n] for n in no_decay], "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: closed_form_lr(s, 1.0, 2, STEPS, 0.1))
    clipped = 0
    for step, micro in enumerate(rec["batches"]):
        want_lr = closed_form_lr(step, peak, 2, STEPS, 0.1)
        ran = {wd: (lr, ns) for lr, wd, ns in rec["groups"][step]}  # weight decay -> (lr, parameter names)
        assert sorted(ran) == [0.0, 0.5] and ran[0.5][1] == decay and ran[0.0][1] == no_decay, step
        assert ran[0.5][0] == ran[0.0][0] == pytest.approx(want_lr, rel=1e-12), step
        tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
        loss = sum(F.cross_entropy(model(b["input_ids"], b.get("position_ids"), b.get("doc_ids")).flatten(0, 1),
                                   b["labels"].flatten(), ignore_index=-100, reduction="sum") for b in micro) / tokens
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        clipped += norm > clip
        opt.step()
        opt.zero_grad()
        sched.step()
        assert losses[step + 1] == pytest.approx(float(loss), rel=1e-5), step
        assert norms[step + 1] == pytest.approx(norm, rel=1e-4), step
    assert clipped >= 3  # clipping changed most steps' updates
    for name, value in model.named_parameters():
        torch.testing.assert_close(rec["final"][name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    moved = max(float((rec["final"][n] - rec["init"][n]).abs().max()) for n in names)
    assert moved > 1e-2  # the parameters really moved (tolerances above are far below a step)
