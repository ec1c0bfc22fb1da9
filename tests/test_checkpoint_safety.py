"""Loading a checkpoint runs no code planted in it (issue 27): a pickle in a part, in a DCP item, in ``.metadata``
or in DeepSpeed's per-rank file is refused with a clear error, and the marker its ``__reduce__`` would create is
never made; a clean checkpoint still restores exactly, and an older loomtrain's pickled parts load only on opt-in.

One forked run trains 2 steps of the tiny model, then (in the same process, on the real ``TrainState``) copies its
checkpoint, plants one thing per variant and loads it; each test reads one variant's outcome."""
import io
import os
import pickle
import shutil

import pytest

from conftest import TEST_OVERRIDES, run_ranks

TRUST = "LOOMTRAIN_TRUST_CHECKPOINT_PICKLE"


class Evil:
    """Unpickling it creates the directory ``marker``: the code a planted checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _read_metadata(ckpt):
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        return pickle.load(f)  # the test's own, just written


def _write_metadata(ckpt, meta):
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(meta, f)


def _plant_item(ckpt, fqn, blob: bytes):
    """Make DCP item ``fqn`` of the checkpoint ``ckpt`` read as ``blob``: appended to its file, the metadata
    pointing at it (what an attacker with write access to a shared checkpoint can do)."""
    import dataclasses

    meta = _read_metadata(ckpt)
    (index, info), = [(i, s) for i, s in meta.storage_data.items() if i.fqn == fqn]
    path = os.path.join(ckpt, info.relative_path)
    offset = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(blob)
    meta.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob))
    _write_metadata(ckpt, meta)


class _FakeDeepSpeed:
    """``engine.save_checkpoint`` / ``load_checkpoint`` of DeepSpeed, keeping the client state in memory: what
    ``DeepSpeedCheckpointer`` adds around them (its per-rank file) is what is under test."""

    def __init__(self):
        self.client = None

    def save_checkpoint(self, root, tag, save_latest, client_state):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        self.client = dict(client_state)

    def load_checkpoint(self, root, tag):
        return os.path.join(root, tag), dict(self.client)


def _attacks(rank, overrides, work):
    """Train, then load one copy of the run's checkpoint per variant: {variant: outcome}."""
    import random

    import numpy as np
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    from loomtrain.launch import train as launch_train
    from loomtrain.trainer import train as train_mod
    from loomtrain.trainer.checkpoint import DeepSpeedCheckpointer, rng_state
    from loomtrain.trainer.config import load_config

    outcomes, original = {}, train_mod.Trainer.fit

    def snapshot(trainer):
        return {"rng": rng_state(), "params": [p.detach().clone() for p in trainer.model.parameters()],
                "sampler": trainer.state.parts["sampler"].state_dict()}

    def perturb(trainer):
        torch.manual_seed(999)
        np.random.seed(999)
        random.seed(999)
        trainer.state.parts["sampler"].load_state_dict(trainer.state.parts["sampler"].state_dict() | {"consumed": 0})
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(1.0)

    def same(a, b, params: bool) -> bool:
        ra, rb = a["rng"], b["rng"]
        return (torch.equal(ra["torch"], rb["torch"]) and ra["numpy"][0] == rb["numpy"][0]
                and np.array_equal(ra["numpy"][1], rb["numpy"][1]) and ra["numpy"][2:] == rb["numpy"][2:]
                and ra["python"] == rb["python"] and a["sampler"] == b["sampler"]
                and (not params or all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))))

    def attempt(trainer, name, load, saved, trusted=False, params=True):
        """Perturb, load; the outcome: the error (type, message), or the step and whether the state came back
        exactly (parameters only where the checkpointer restores them: not with the fake DeepSpeed engine)."""
        perturb(trainer)
        if trusted:
            os.environ[TRUST] = "1"
        try:
            step = load()
            outcomes[name] = {"error": None, "step": step, "exact": same(snapshot(trainer), saved, params)}
        except (Exception, CheckpointException) as e:  # the outcome is what the tests assert on (DCP's
            # CheckpointException, which wraps what a rank raised, is a BaseException)
            outcomes[name] = {"error": type(e).__name__, "message": str(e)}
        finally:
            os.environ.pop(TRUST, None)

    def fit(self):
        result = original(self)
        clean = self.ckpt.save(self.state, 100)
        self.ckpt.wait()
        saved = snapshot(self)
        old_rng = pickle.dumps([saved["rng"]])  # an older loomtrain's per-rank part: all ranks' states, pickled
        old_host = pickle.dumps(self.state.parts["dp_sync"].state_dict())
        plants = {
            "clean": lambda d: None,
            "part_pickle": lambda d: _plant_item(d, "rng", _torch_bytes(pickle.dumps(Evil(f"{work}/part_pickle")))),
            "host_pickle": lambda d: _plant_item(d, "dp_sync.host",
                                                 _torch_bytes(pickle.dumps(Evil(f"{work}/host_pickle")))),
            "item_pickle": lambda d: _plant_item(d, "trainer.step", _torch_bytes(Evil(f"{work}/item_pickle"))),
            "metadata_pickle": lambda d: _write_metadata(d, _with_evil(_read_metadata(d), f"{work}/metadata_pickle")),
            "old_format": lambda d: (_plant_item(d, "rng", _torch_bytes(old_rng)),
                                     _plant_item(d, "dp_sync.host", _torch_bytes(old_host))),
        }
        for name, plant in plants.items():
            target = os.path.join(work, "ckpt", name)
            shutil.copytree(clean, target)
            plant(target)
            attempt(self, name, lambda: self.ckpt.load(target, self.state), saved)
            if name == "old_format":
                attempt(self, "old_format_trusted", lambda: self.ckpt.load(target, self.state), saved, trusted=True)

        # DeepSpeed's checkpointer: loomtrain's own per-rank file beside the engine's files.
        ds = DeepSpeedCheckpointer(os.path.join(work, "ds"), keep=0, rank=0, engine=_FakeDeepSpeed())
        ds_clean = ds.save(self.state, 7)
        saved = snapshot(self)
        rng_file = "loomtrain_rng_rank0.pt"
        ds_plants = {
            "ds_clean": lambda d: None,
            "ds_pickle": lambda d: torch.save({"rng": Evil(f"{work}/ds_pickle")}, os.path.join(d, rng_file)),
            "ds_old_format": lambda d: torch.save({"rng": saved["rng"]}, os.path.join(d, rng_file)),  # as written
        }
        for name, plant in ds_plants.items():
            target = os.path.join(work, "ds", name)
            shutil.copytree(ds_clean, target)
            plant(target)
            attempt(self, name, lambda: ds.load(target, self.state), saved, params=False)
            if name == "ds_old_format":
                attempt(self, "ds_old_format_trusted", lambda: ds.load(target, self.state), saved, trusted=True,
                        params=False)
        return result

    train_mod.Trainer.fit = fit
    launch_train.run(load_config("tiny", overrides))
    return outcomes


def _with_evil(meta, marker):
    meta.evil = Evil(marker)  # pickled with the metadata, built (its __reduce__ run) when it is unpickled
    return meta


@pytest.fixture(scope="module")
def outcomes(small_corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("safety")
    overrides = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={work / 'run'}",
                                  "train.steps=2", "checkpoint.keep=0"]
    (result,) = run_ranks(_attacks, 0, overrides, str(work))
    return work, result


def test_clean_checkpoint_restores_exactly(outcomes):
    """RNG streams (torch, numpy, Python), data position and parameters, perturbed after the save, come back
    bit for bit from the JSON-encoded parts."""
    _, result = outcomes
    assert result["clean"] == {"error": None, "step": 100, "exact": True}
    assert result["ds_clean"] == {"error": None, "step": 7, "exact": True}


@pytest.mark.parametrize("variant, says", [
    ("part_pickle", "part 'rng' is pickled"),
    ("host_pickle", "part 'dp_sync.host' is pickled"),
    ("item_pickle", "item 'trainer.step' is not plain data (it refers to posix.mkdir)"),
    ("metadata_pickle", "it refers to posix.mkdir, which DCP metadata never holds"),
    ("ds_pickle", "it is not plain data (it refers to posix.mkdir)"),
])
def test_planted_pickle_is_refused_without_running(outcomes, variant, says):
    """A pickle planted in a per-rank part, a tensor part's host state, a DCP item, ``.metadata`` or the DeepSpeed
    per-rank file: the load raises ``UnsafeCheckpointError`` naming what it refused, and the pickle's code (make
    the marker directory) never ran."""
    work, result = outcomes
    assert not (work / variant).exists(), "the planted pickle ran"
    assert result[variant]["error"] == "UnsafeCheckpointError", result[variant]
    assert says in result[variant]["message"] and "--resume: refusing" in result[variant]["message"]
    assert "\n" not in result[variant]["message"]


@pytest.mark.parametrize("variant", ["old_format", "ds_old_format"])
def test_older_pickled_checkpoint_is_refused_then_loads_on_opt_in(outcomes, variant):
    """A checkpoint an older loomtrain wrote (pickled parts, DeepSpeed's numpy RNG pickle) is refused, the error
    saying how to load it; with ``LOOMTRAIN_TRUST_CHECKPOINT_PICKLE=1`` it restores exactly."""
    _, result = outcomes
    refused = result[variant]
    assert refused["error"] == "UnsafeCheckpointError", refused
    assert "older loomtrain" in refused["message"] and f"{TRUST}=1" in refused["message"]
    assert result[variant + "_trusted"]["error"] is None and result[variant + "_trusted"]["exact"], result
