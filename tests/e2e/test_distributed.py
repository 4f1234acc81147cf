"""Several processes: ``model-tailor tailor`` on 2 gloo ranks (CPU, localhost only) against one process, on the
pico Llama (docs/METHOD.md §9 "Several processes").

Each rank is started the way torchrun starts it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), each in its own working folder with a relative ``--out``: whatever rank 1 wrote would land in its
own folder, which must stay empty. One test launches through ``python -m torch.distributed.run`` itself. Every
launch is killed after ``TIMEOUT`` seconds, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

TIMEOUT = 180
OPTIONS = {"density": 0.25, "batch_size": 2, "samples": 5}  # 5 records in batches of 2: ranks get 2 and 1
ERROR = "model-tailor tailor: error: "

# An interrupted run: rank 0 stops right after the first block is checkpointed, rank 1 carries on until the
# next collective tells it. Each rank prints its error as one line.
STOP_ON_RANK_0 = """
import json, os, sys
from model_tailor.config import TailorConfig
from model_tailor.pipeline.run import run_tailor

def stop(block):
    if os.environ["RANK"] == "0":
        raise RuntimeError(f"stopped after {block}")

try:
    run_tailor(TailorConfig.build(**json.loads(sys.argv[1])), on_block_done=stop)
except Exception as err:
    print(f"{type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(1)
"""

# The group's teardown: the pipeline imports transformers (and through it FSDP and torch.distributed.nn.functional)
# after the group is up; the group must still be gone, its gloo threads joined, once open_group has closed it.
# A group that outlives it has worker threads that can abort the interpreter's shutdown (SIGABRT, exit -6).
TEARDOWN = """
import os
from model_tailor.pipeline.distributed import open_group

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)

with open_group("cpu") as group:
    import torch.distributed.fsdp  # noqa: F401
    assert gloo_threads(), "no gloo threads while the group is open: this check would prove nothing"
    group.gather(group.rank)
print(gloo_threads())
"""


@dataclass
class Rank:
    code: int
    out: str
    err: str

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", **extra}


def _wait(procs: list[subprocess.Popen]) -> list[Rank]:
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a rank did not finish within {TIMEOUT} s (hang)")
    return [Rank(p.returncode, o, e) for p, (o, e) in zip(procs, outs, strict=True)]


def _launch(command: list[str], cwds: list[Path]) -> list[Rank]:
    """Start one process per folder in ``cwds`` with torchrun's environment; wait for all of them."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, *command],
            cwd=cwd,
            env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(len(cwds)), MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, cwd in enumerate(cwds)
    ]
    return _wait(procs)


def _argv(pair, calibration: str | Path | None = None, **extra) -> list[str]:
    fields = {"base": pair.base, "finetuned": pair.finetuned, "calibration": calibration or pair.calibration}
    argv = ["-m", "model_tailor", "tailor"]
    for key, value in {**fields, **OPTIONS, "out": "p.safetensors", **extra}.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _folders(tmp_path: Path) -> list[Path]:
    cwds = [tmp_path / "rank0", tmp_path / "rank1"]
    for c in cwds:
        c.mkdir()
    return cwds


@pytest.fixture(scope="module")
def single(pico):
    """The one-process patch of the same options: the oracle."""
    from model_tailor.api import tailor

    pair = pico("llama")
    return tailor(pair.base, pair.finetuned, pair.calibration, **OPTIONS)


def _assert_same_patch(path: Path, single) -> None:
    """Same tensors and masks as one process; values equal up to fp32 summation order of the Hessians."""
    from model_tailor.patch.format import load_patch

    patch = load_patch(path)
    assert sorted(patch.tensors) == sorted(single.patch.tensors)
    for name, entry in patch.tensors.items():
        ref = single.patch.tensors[name]
        assert torch.equal(entry.indices, ref.indices), name
        torch.testing.assert_close(entry.values, ref.values, rtol=1e-4, atol=1e-5, msg=name)


def test_two_ranks_make_the_one_process_patch_and_rank_1_writes_nothing(pico, single, tmp_path):
    pair = pico("llama")
    cwds = _folders(tmp_path)
    ranks = _launch(_argv(pair, save_model="model"), cwds)
    assert [r.code for r in ranks] == [0, 0], [r.err for r in ranks]
    assert ranks[0].out and not ranks[1].out  # rank 0 alone prints the summary
    assert sorted(p.name for p in cwds[0].iterdir()) == ["model", "p.safetensors", "p.safetensors.report.json"]
    assert list(cwds[1].iterdir()) == []
    _assert_same_patch(cwds[0] / "p.safetensors", single)
    report = json.loads((cwds[0] / "p.safetensors.report.json").read_text())
    # token counts are summed over the ranks: every layer saw all calibration tokens, as in one process
    assert [layer["n_tokens"] for layer in report["layers"]] == [layer.n_tokens for layer in single.report.layers]
    assert report["layers"][0]["n_tokens"] == report["calibration"]["n_tokens"] > 0


def test_an_error_on_one_rank_ends_both_with_one_line(pico, tmp_path):
    """Rank 1's calibration file is broken (its own folder), rank 0's is fine: rank 0 stops with rank 1's error."""
    pair = pico("llama")
    cwds = _folders(tmp_path)
    shutil.copy(pair.calibration, cwds[0] / "calib.jsonl")
    (cwds[1] / "calib.jsonl").write_text('{"text": "the cat"}\nnot json\n')
    ranks = _launch(_argv(pair, calibration="calib.jsonl"), cwds)
    assert [r.code for r in ranks] == [1, 1], [r.err for r in ranks]
    (own,), (relayed,) = ranks[1].error_lines(), ranks[0].error_lines()
    assert own.startswith(ERROR) and "calib.jsonl:2" in own
    assert relayed == f"{ERROR}rank 1 failed: {own.removeprefix(ERROR)}"
    assert sorted(p.name for p in cwds[0].iterdir()) == ["calib.jsonl"]  # nothing written, no lock left
    assert sorted(p.name for p in cwds[1].iterdir()) == ["calib.jsonl"]


def test_torchrun_mismatched_checkpoints_end_every_rank(pico, tmp_path):
    """Launched by torchrun: both ranks find base and fine-tuned of different architectures after the group has
    started, and both stop with the one line (torchrun adds its own summary after it)."""
    pair = pico("llama")
    other = tmp_path / "other"
    shutil.copytree(pair.finetuned, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    out = tmp_path / "p.safetensors"
    argv = _argv(pair, out=out)
    argv[argv.index(str(pair.finetuned))] = str(other)
    port = str(_free_port())
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    (ranks,) = _wait([subprocess.Popen([sys.executable, *launcher, *argv], cwd=tmp_path, env=_env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)])  # fmt: skip
    assert ranks.code != 0
    lines = [line for line in ranks.err.splitlines() if line.startswith(ERROR)]
    assert lines and all("different architectures" in line for line in lines), ranks.err
    assert not out.exists() and not any(p.name.startswith(".p.safetensors") for p in tmp_path.iterdir())


def test_interrupted_run_resumes_on_two_ranks(pico, single, tmp_path):
    pair = pico("llama")
    cwds = _folders(tmp_path)
    fields = {"base": str(pair.base), "finetuned": str(pair.finetuned), "calibration": str(pair.calibration)}
    ranks = _launch(["-c", STOP_ON_RANK_0, json.dumps({**fields, **OPTIONS, "out": "p.safetensors"})], cwds)
    assert [r.code for r in ranks] == [1, 1], [r.err for r in ranks]
    assert ranks[0].error_lines() == ["RuntimeError: stopped after model.layers.1"]
    assert ranks[1].error_lines() == ["RankError: rank 0 failed: RuntimeError: stopped after model.layers.1"]
    (work,) = [p for p in cwds[0].iterdir()]
    assert work.name.startswith(".p.safetensors.work-") and (work / "model.layers.1.safetensors").is_file()
    assert list(cwds[1].iterdir()) == []

    ranks = _launch(_argv(pair), cwds)
    assert [r.code for r in ranks] == [0, 0], [r.err for r in ranks]
    report = json.loads((cwds[0] / "p.safetensors.report.json").read_text())
    assert [layer["resumed"] for layer in report["layers"]] == [True, False]
    _assert_same_patch(cwds[0] / "p.safetensors", single)
    assert sorted(p.name for p in cwds[0].iterdir()) == ["p.safetensors", "p.safetensors.report.json"]
    assert list(cwds[1].iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_the_group_is_gone_when_open_group_closes_it(tmp_path):
    ranks = _launch(["-c", TEARDOWN], _folders(tmp_path))
    assert [r.code for r in ranks] == [0, 0], [r.err for r in ranks]
    assert [r.out.strip() for r in ranks] == ["[]", "[]"]
