"""Real multi-process training: Lightning DDP on 2 CPU processes (gloo) through train.py.

- a few steps of DDP equal one process on the concatenated batches (trunk and whole table);
- SIGTERM (on either rank) writes a checkpoint after the batch in progress and exits 143 (2 ranks: a DCP
  folder, each rank its own rows); the same command with ckpt_path= continues, on 1, 2 or 3 ranks, with the
  table and moments bit-exact after the reshard (2 → 1, 2 → 3 and 1 → 2);
- kill -9 loses at most the batches since the last every-N checkpoint (a file on 1 rank, a DCP folder on 2);
- a rank killed with -9 makes the other stop with an error, not hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
N = 6  # batches per epoch
SMALL = ["data.batches_per_epoch=6", "data.batch_size=16", "data.num_workers=0", "trainer.max_epochs=2",
         "trainer.check_val_every_n_epoch=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "data.val_max_images=100", "validation.projector_tags=50", "validation.grid_images=0"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def train(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """train.py in its own process group: on a timeout the whole group (Lightning's rank 1 too) is killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, f"hydra.run.dir={run_dir}", *overrides]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"train.py ran past {timeout} s (a hang?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def ckpt(path: Path) -> dict:
    """A checkpoint's contents; a sharded run's DCP folder read whole, as one device holds it."""
    if path.is_dir():
        from im2vec.train.checkpoint import read_checkpoint

        return read_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_restored(dump: Path, checkpoint: Path) -> None:
    """What the resumed ranks hold before their first step is exactly what the checkpoint holds."""
    got, c = torch.load(dump), ckpt(checkpoint)
    assert torch.equal(got["table"], c["state_dict"]["table.embedding.weight"])
    state = c["optimizer_states"][1]["state"][0]
    assert got["step"] == state["step"]
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(got[k], state[k]), k
    assert got["batches"] * 2 == c["global_step"]


# the default run's one multi-process training (train.py's DDP path); every other run here is marked slow
@pytest.mark.parametrize("tag_vectors", [[], pytest.param(["--tag-vectors"], marks=pytest.mark.slow)],
                         ids=["table", "tag_vectors"])
def test_ddp_steps_equal_one_process_on_the_concatenated_batch(tmp_path, tag_vectors):
    """With --tag-vectors, a third of the tags are r + A·w (model.tag_vectors): A trained by DDP beside the trunk."""
    script = ROOT / "tests" / "ddp_equivalence.py"
    for extra in ([], ["--reference"]):
        r = subprocess.run([sys.executable, str(script), "--world", "2", "--out", str(tmp_path), *extra, *tag_vectors],
                           cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1, ref = (torch.load(tmp_path / f) for f in ("rank0.pt", "rank1.pt", "reference.pt"))
    assert rank0["batches"] == ref["batches"] == 4
    for k, v in ref["trunk"].items():
        assert torch.equal(rank0["trunk"][k], rank1["trunk"][k]), f"trunk {k} differs between ranks"
        torch.testing.assert_close(rank0["trunk"][k], v, rtol=0, atol=1e-6, msg=f"trunk {k}")
        assert not torch.equal(v, torch.zeros_like(v)) or k.endswith("bias")
    for k, v in ref["whole"].items():
        torch.testing.assert_close(rank0["whole"][k].double(), v.double(), rtol=0, atol=1e-6, msg=f"table {k}")
    assert ("A" in ref["whole"]) == bool(tag_vectors)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes_across_world_sizes(tmp_path):
    # one process, a signal when batch 3 starts: batch 3 completes, the checkpoint has 4 batches, exit 143
    # SLURM's pre-emption warning (sbatch --signal=USR1@120) is handled as SIGTERM is
    one = train(tmp_path / "one", "+callbacks.sig._target_=run_callbacks.SignalAt", "+callbacks.sig.batch=3",
                "+callbacks.sig.sig=SIGUSR1")
    assert one.returncode == 143, one.stderr[-3000:]
    assert "stopped by SIGUSR1 after 4 batches" in one.stderr
    pre1 = tmp_path / "one" / "checkpoints" / "preempted.ckpt"
    assert f"ckpt_path={pre1}" in one.stderr
    assert ckpt(pre1)["global_step"] == 2 * 4
    assert not list((tmp_path / "one" / "checkpoints").glob("*.tmp-*"))
    # 1 -> 2 ranks: exact table and moments, then the run finishes (2 epochs of N batches in all)
    res2 = train(tmp_path / "res2", *DDP, f"ckpt_path={pre1}", "+callbacks.dump._target_=run_callbacks.DumpAtStart",
                 f"+callbacks.dump.path={tmp_path / 'dump12.pt'}")
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert_restored(tmp_path / "dump12.pt", pre1)
    assert ckpt(tmp_path / "res2" / "checkpoints" / "last.ckpt")["global_step"] == 2 * 2 * N
    assert "test figures" in res2.stdout

    # two processes, SIGTERM to rank 1 only (rank 0 learns it with the batch's all-reduce)
    two = train(tmp_path / "two", *DDP, "+callbacks.sig._target_=run_callbacks.SignalAt", "+callbacks.sig.batch=2",
                "+callbacks.sig.rank=1")
    assert two.returncode == 143, two.stderr[-3000:]
    pre2 = tmp_path / "two" / "checkpoints" / "preempted.ckpt"
    assert (pre2 / "__1_0.distcp").is_file()  # a DCP folder: each rank wrote its own rows
    c2 = ckpt(pre2)
    assert c2["global_step"] == 2 * 3 and c2["im2vec"]["world_size"] == 2
    assert c2["state_dict"]["table.embedding.weight"].shape[0] == c2["im2vec"]["num_tags"]  # read whole
    # 2 -> 1 rank
    res1 = train(tmp_path / "res1", f"ckpt_path={pre2}", "+callbacks.dump._target_=run_callbacks.DumpAtStart",
                 f"+callbacks.dump.path={tmp_path / 'dump21.pt'}")
    assert res1.returncode == 0, res1.stderr[-3000:]
    assert_restored(tmp_path / "dump21.pt", pre2)
    assert ckpt(tmp_path / "res1" / "checkpoints" / "last.ckpt")["global_step"] == 2 * 2 * N
    # 2 -> 3 ranks: each reads its rows of the folder
    res3 = train(tmp_path / "res3", *DDP[:-1], "trainer.devices=3", f"ckpt_path={pre2}",
                 "+callbacks.dump._target_=run_callbacks.DumpAtStart", f"+callbacks.dump.path={tmp_path / 'dump23.pt'}")
    assert res3.returncode == 0, res3.stderr[-3000:]
    assert_restored(tmp_path / "dump23.pt", pre2)
    # evaluation and prediction read a checkpoint written by 2 ranks as any other
    from im2vec.use.predict import load_model

    model = load_model(str(pre2))
    assert torch.equal(model.table, c2["state_dict"]["table.embedding.weight"])


@pytest.mark.slow
def test_kill_9_loses_at_most_the_batches_since_the_last_checkpoint(tmp_path):
    run = train(tmp_path / "k", "callbacks.checkpoint.every_n_batches=2",
                "+callbacks.kill._target_=run_callbacks.SignalAt", "+callbacks.kill.batch=5",
                "+callbacks.kill.sig=SIGKILL")
    assert run.returncode == -signal.SIGKILL
    last = tmp_path / "k" / "checkpoints" / "last.ckpt"
    assert ckpt(last)["global_step"] == 2 * 4  # killed with 5 batches done: the every-2 checkpoint after 4, one lost
    # resumed mid-epoch: the rest of the epoch's stream is seeded by (seed, epoch, batches done), so two
    # resumes from one checkpoint train the same model
    ends = []
    for name in ("k2", "k3"):
        res = train(tmp_path / name, f"ckpt_path={last}", "trainer.deterministic=true")
        assert res.returncode == 0, res.stderr[-3000:]
        end = ckpt(tmp_path / name / "checkpoints" / "last.ckpt")
        assert end["global_step"] == 2 * 2 * N
        ends.append(end["state_dict"])
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


@pytest.mark.slow
def test_kill_9_of_a_sharded_run_keeps_the_last_every_n_folder(tmp_path):
    """2 ranks, every-2-batch DCP folders, rank 0 killed with -9 as batch 5 starts: the folder written after batch
    4 is whole, and the run resumes from it on 2 ranks with the table and moments exact."""
    run = train(tmp_path / "k", *DDP, "callbacks.checkpoint.every_n_batches=2",
                "+callbacks.kill._target_=run_callbacks.SignalAt", "+callbacks.kill.batch=5",
                "+callbacks.kill.sig=SIGKILL", timeout=240)
    assert run.returncode == -signal.SIGKILL
    last = tmp_path / "k" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and ckpt(last)["global_step"] == 2 * 4
    res = train(tmp_path / "k2", *DDP, f"ckpt_path={last}", "+callbacks.dump._target_=run_callbacks.DumpAtStart",
                f"+callbacks.dump.path={tmp_path / 'dump.pt'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_restored(tmp_path / "dump.pt", last)
    assert ckpt(tmp_path / "k2" / "checkpoints" / "last.ckpt")["global_step"] == 2 * 2 * N


@pytest.mark.slow
def test_a_rank_killed_stops_the_other_with_an_error(tmp_path):
    """Not timed: a surviving rank that hangs instead of failing runs into train()'s timeout (240 s, well past
    the collectives' 60 s), which kills the process group and fails the test."""
    run = train(tmp_path / "d", *DDP, "trainer.strategy.timeout.seconds=60", "callbacks.checkpoint.every_n_batches=2",
                "+callbacks.kill._target_=run_callbacks.SignalAt", "+callbacks.kill.batch=3",
                "+callbacks.kill.sig=SIGKILL", "+callbacks.kill.rank=1", timeout=240)
    assert run.returncode not in (0, 143), run.stderr[-2000:]
    last = tmp_path / "d" / "checkpoints" / "last.ckpt"
    assert ckpt(last)["global_step"] == 2 * 2  # the every-2-batches checkpoint before the death


def launch(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            pytest.fail("torchrun ran past its time (a hang?)")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.mark.slow
def test_torchrun_recipes_one_node_and_two_nodes(tmp_path):
    """The README's launch lines, on CPU: torchrun on one node, and two 'nodes' meeting at a c10d rendezvous."""
    from test_dist import free_port

    common = [*SMALL, "trainer=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=1",
              "trainer.check_val_every_n_epoch=1"]
    run = sys.executable, "-m", "torch.distributed.run"
    one = launch([*run, "--nproc_per_node=2", "train.py", *common, "trainer.devices=2",
                  f"hydra.run.dir={tmp_path / 'one'}"])
    (out,) = finish([one])
    assert "sharded by rows over 2 ranks" in out and "test figures" in out
    rdzv = [f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_backend=c10d", "--rdzv_id=im2vec-test", "--nnodes=2",
            "--nproc_per_node=1"]
    nodes = [launch([*run, *rdzv, "train.py", *common, "trainer.devices=1", "trainer.num_nodes=2",
                     f"hydra.run.dir={tmp_path / 'two'}"]) for _ in range(2)]
    outs = finish(nodes)
    assert sum("test figures" in o for o in outs) == 1  # rank 0 (on whichever node) prints the figures
    assert ckpt(tmp_path / "two" / "checkpoints" / "last.ckpt")["im2vec"]["world_size"] == 2


@pytest.mark.slow
def test_slurm_recipe_with_the_environment_srun_gives_its_tasks(tmp_path):
    """`srun python train.py trainer=ddp …`: srun starts every task itself with SLURM_* variables; here two
    processes get exactly those (1 node, 2 tasks) and Lightning's SLURM environment takes it from there."""
    job = str(20000 + os.getpid() % 9000)  # Lightning derives the rendezvous port from the job id
    procs = []
    for rank in range(2):
        env = {**os.environ, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
               "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_ID": job, "SLURM_JOB_NAME": "im2vec-test"}
        procs.append(subprocess.Popen(
            [sys.executable, "train.py", *SMALL, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
             "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1", f"hydra.run.dir={tmp_path}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outs = finish(procs)
    assert "sharded by rows over 2 ranks" in outs[0] and "test figures" in outs[0]
    assert ckpt(tmp_path / "checkpoints" / "last.ckpt")["im2vec"]["world_size"] == 2
