"""The multi-process launch commands a user types, run as subprocesses on 2 CPU processes (gloo) with real vLLM.

The README's one-node command (``vapo-pl fit --config configs/demo.yaml --config configs/strategies/<s>.yaml
--trainer.devices 2``) for each shipped strategy config, started by Lightning's own launcher; FSDP2 and ZeRO-3
resumed under ``torchrun -m vapo_pl.cli``; a SLURM-style start (two processes with the variables ``srun`` sets, and
nothing else); and two "nodes" on this machine (two ``torchrun --nnodes 2`` agents, one process each, with
``--trainer.num_nodes 2``), where global, local and node rank differ.

Each command is the README's, plus one YAML overlay that a user could write: the tiny test model instead of the demo's
base policy, 3 RL steps of 4 prompts x 4 samples, value pretraining for one step, a checkpoint every 2 steps, and
``tests.launch.probe.LaunchProbe``, a callback that reports from inside the run (ranks, full-weight digests after
every step, and the device of every collective's tensors). Nothing is set up for the run that the CLI would not set
up itself: the environment holds only what the launcher in question provides.

Runs (10 launches, 30-60 s each on 2 cores; all in one module fixture, in this order):
- for ``ddp``, ``fsdp2`` (with a KL loss, so a reference model is loaded), ``deepspeed_zero2`` (saving its pretrained
  critic) and ``deepspeed_zero3`` (loading that critic through ``ValuePretraining(load_path=...)``): a fresh 3-step
  run under Lightning's launcher, then for ``fsdp2`` and ``deepspeed_zero3`` ``torchrun`` resuming its step-2
  checkpoint to step 3 (``RESUMED``);
- ``fsdp2`` with the transformers engine generating from the sharded actor (``data.engine.kind: hf``);
- ``ddp`` with one vLLM engine split over both ranks (``data.engine.tensor_parallel_size 2``);
- ``ddp`` started SLURM-style, and ``ddp`` over two torchrun nodes, each resuming the ``ddp`` run's step-2
  checkpoint to step 3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.launch.probe import digest

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

BIN = Path(sys.executable).parent
TIMEOUT_S = 420
WORLD = 2
STEPS = 3
STRATEGIES = ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")
# resumed under single-node torchrun; DDP's resumes are the SLURM-style and two-node (torchrun) starts, and ZeRO-2
# loads its checkpoint through the same DeepSpeed engine call as ZeRO-3, whose partitioned weights are the harder case
RESUMED = ("fsdp2", "deepspeed_zero3")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict[str, str]:
    """This machine's environment without any launcher's variables (each launcher sets its own)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def _overlay(run: Path, model: Path, strategy: str, critic: Path, engine: str = "vllm") -> Path:
    """The user's YAML on top of the README command: small model, 3 short steps, checkpoints, the probe."""
    pretrain = {"steps": 1}
    if strategy == "deepspeed_zero2":
        pretrain["save_path"] = str(critic)
    if strategy == "deepspeed_zero3":
        pretrain = {"load_path": str(critic)}
    algorithm = {"minibatch_size": 16, "micro_batch_size": 4}  # two micro-batches per optimizer step and rank
    if strategy == "fsdp2":
        algorithm["kl_loss_coef"] = 0.01  # a reference model: FSDP2 must resume without its weights in the checkpoint
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": STEPS, "logger": False, "enable_progress_bar": False, "enable_checkpointing": True,
            "default_root_dir": str(run),
            "callbacks": [
                {"class_path": "vapo_pl.callbacks.ValuePretraining", "init_args": pretrain},
                {"class_path": "vapo_pl.callbacks.Evaluation",  # 3 problems, one per call: ranks make 2 and 1 calls
                 "init_args": {"every_n_steps": STEPS, "samples_per_prompt": 2, "max_problems": 3,
                               "prompts_per_call": 1}},
                {"class_path": "vapo_pl.callbacks.EntropyTracker"},
                {"class_path": "vapo_pl.callbacks.LengthScaling", "init_args": {"window": 2}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run / "ckpt"), "every_n_train_steps": 2, "save_top_k": -1,
                               "filename": "step{step}", "auto_insert_metric_name": False}},
                {"class_path": "tests.launch.probe.LaunchProbe", "init_args": {"out": str(run / "probe")}},
            ],
        },
        "model": {"init_args": {"model_path": str(model), "algorithm": algorithm}},
        "data": {"init_args": {
            "train_files": str(REPO / "vapo_pl/demo/data/train.jsonl"),
            "val_files": str(REPO / "vapo_pl/demo/data/heldout.jsonl"),
            "prompts_per_step": 4, "samples_per_prompt": 4, "max_response_length": 16,
            "engine": {"kind": engine, "dtype": "float32"}}},
    }
    path = run / "overlay.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _readme_args(strategy: str, overlay: Path) -> list[str]:
    return ["fit", "--config", "configs/demo.yaml", "--config", f"configs/strategies/{strategy}.yaml",
            "--config", str(overlay)]


@dataclass
class Launch:
    name: str
    run: Path
    returncode: int | None
    seconds: float

    def _fail(self, msg: str) -> None:
        logs = sorted(self.run.glob("*.log"))
        tail = "\n".join(f"--- {p.name} ---\n" + p.read_text(errors="replace")[-3000:] for p in logs)
        pytest.fail(f"{self.name}: {msg} (exit code {self.returncode}, {self.seconds:.0f} s)\n{tail}", pytrace=False)

    def ranks(self) -> list[dict]:
        out = []
        for r in range(WORLD):
            p = self.run / "probe" / f"rank{r}.json"
            if self.returncode != 0 or not p.exists():
                self._fail(f"no result from rank {r}")
            out.append(json.loads(p.read_text()))
        return out

    def checkpoint(self, step: int) -> Path:
        path = self.run / "ckpt" / f"step{step}.ckpt"
        if not path.exists():
            self._fail(f"no checkpoint at step {step} in {sorted(p.name for p in (self.run / 'ckpt').glob('*'))}")
        return path


def _wait(procs: list[subprocess.Popen], deadline: float) -> int | None:
    """Wait for every process; on timeout kill each one's process group. The first non-zero exit code, or None."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for q in procs:
                q.wait()
            return None
    return next((c for c in codes if c != 0), 0)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def launch(name: str, run: Path, how: str, args: list[str], timeout_s: float = TIMEOUT_S) -> Launch:
    """Start ``vapo-pl`` ``args`` the way ``how`` says and wait for it (killed after ``timeout_s``)."""
    run.mkdir(parents=True, exist_ok=True)
    env = _base_env()
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    port = str(_free_port())
    if how == "lightning":  # the README's one-node command: Lightning starts the second process itself
        procs = [_start([str(BIN / "vapo-pl"), *args, "--trainer.devices", str(WORLD)], env, run / "launch.log")]
    elif how == "torchrun":
        procs = [_start([str(BIN / "torchrun"), "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
                         "--master_port", port, "-m", "vapo_pl.cli", *args, "--trainer.devices", str(WORLD)],
                        env, run / "launch.log")]
    elif how == "two_nodes":  # one agent per "node", one process each: global rank 1 has local rank 0, node rank 1
        procs = [_start([str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                         "--master_addr", "127.0.0.1", "--master_port", port, "-m", "vapo_pl.cli", *args,
                         "--trainer.devices", "1", "--trainer.num_nodes", "2"], env, run / f"node{node}.log")
                 for node in range(2)]
    elif how == "slurm":  # what `srun --ntasks 2` sets for each task; Lightning takes the port from the job id
        job_id = next(j for j in range(431, 1000) if _port_free(15000 + j))
        procs = []
        for r in range(WORLD):
            task_env = dict(env, SLURM_NTASKS=str(WORLD), SLURM_NTASKS_PER_NODE=str(WORLD), SLURM_NNODES="1",
                            SLURM_NODEID="0", SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_JOB_ID=str(job_id),
                            SLURM_JOB_NAME="vapo", SLURM_NODELIST="127.0.0.1", SLURM_STEP_NUM_TASKS=str(WORLD))
            procs.append(_start([str(BIN / "vapo-pl"), *args, "--trainer.devices", str(WORLD)], task_env,
                                run / f"task{r}.log"))
    else:
        raise ValueError(how)
    code = _wait(procs, deadline)
    return Launch(name=name, run=run, returncode=code, seconds=time.monotonic() - t0)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def launches(tiny_model_dir, tmp_path_factory) -> dict[str, Launch]:
    root = tmp_path_factory.mktemp("launch")
    critic = root / "pretrained_critic.pt"
    out: dict[str, Launch] = {}
    for strategy in STRATEGIES:
        run = root / f"{strategy}_lightning"
        run.mkdir()
        overlay = _overlay(run, tiny_model_dir, strategy, critic)
        fresh = launch(f"{strategy}/lightning", run, "lightning", _readme_args(strategy, overlay))
        out[f"{strategy}/lightning"] = fresh
        if strategy not in RESUMED:
            continue
        resumed_run = root / f"{strategy}_torchrun_resume"
        resumed_run.mkdir()
        resumed_overlay = _overlay(resumed_run, tiny_model_dir, strategy, critic)
        ckpt = fresh.run / "ckpt" / "step2.ckpt"
        out[f"{strategy}/torchrun_resume"] = launch(
            f"{strategy}/torchrun_resume", resumed_run, "torchrun",
            [*_readme_args(strategy, resumed_overlay), "--ckpt_path", str(ckpt)])
    # the transformers engine on the FSDP2-sharded actor: every forward gathers weights, so ranks whose rows finish
    # early (or that have fewer evaluation calls) must keep stepping with the others
    run = root / "fsdp2_hf_lightning"
    run.mkdir()
    out["fsdp2_hf/lightning"] = launch("fsdp2_hf/lightning", run, "lightning",
                                       _readme_args("fsdp2", _overlay(run, tiny_model_dir, "fsdp2", critic, "hf")),
                                       timeout_s=180)
    # one vLLM engine over both ranks (tensor parallel 2), through the CLI
    run = root / "ddp_tp2_lightning"
    run.mkdir()
    out["ddp_tp2/lightning"] = launch("ddp_tp2/lightning", run, "lightning",
                                      [*_readme_args("ddp", _overlay(run, tiny_model_dir, "ddp", critic)),
                                       "--data.init_args.engine.tensor_parallel_size", "2"])
    for how in ("slurm", "two_nodes"):  # each resumes the one-node DDP run's step-2 checkpoint
        run = root / f"ddp_{how}"
        run.mkdir()
        out[f"ddp/{how}"] = launch(f"ddp/{how}", run, how,
                                   [*_readme_args("ddp", _overlay(run, tiny_model_dir, "ddp", critic)),
                                    "--ckpt_path", str(out["ddp/lightning"].run / "ckpt" / "step2.ckpt")])
    out["_critic"] = critic  # type: ignore[assignment]
    yield out
    shutil.rmtree(root, ignore_errors=True)


def _assert_ranks_agree(ranks: list[dict], steps: int, engine: str = "VLLMEngine") -> None:
    assert sorted(r["global_rank"] for r in ranks) == list(range(WORLD))
    assert all(r["world_size"] == WORLD for r in ranks)
    for r in ranks:
        assert len(r["steps"]) == steps, (r["global_rank"], r["steps"])
        assert r["engine"] == engine
    for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert a == b, f"ranks differ after RL step {a['step']}"  # bit-identical full actor and critic
    for a, b in zip(ranks[0]["prompts"], ranks[1]["prompts"]):
        assert a and b and not set(a) & set(b)  # from different data: the gradients were averaged


def _assert_collectives_on_served_devices(ranks: list[dict]) -> None:
    for r in ranks:
        assert r["collectives"].get("all_reduce", 0) > 0  # the check saw the run's collectives
        assert r["violations"] == [], r["violations"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_readme_command_under_lightnings_launcher(launches, strategy):
    """``vapo-pl fit ... --trainer.devices 2``: Lightning starts rank 1 (no ``RANK`` in its environment), each rank
    builds its vLLM engine, pretrains the critic, trains 3 RL steps; the ranks hold bit-identical weights after every
    step, and the steps moved them."""
    ranks = launches[f"{strategy}/lightning"].ranks()
    _assert_ranks_agree(ranks, STEPS)
    if not strategy.startswith("deepspeed"):  # Lightning's DeepSpeed strategy exports RANK itself; the others do not
        assert ranks[1]["env"]["RANK"] is None  # so the engine got it from the trainer
    digests = [ranks[0]["start"]["actor"]] + [s["actor"] for s in ranks[0]["steps"]]
    assert len(set(digests)) == STEPS + 1
    assert [s["policy_version"] for s in ranks[0]["steps"]] == [1, 2, 3]
    assert [r["holds_full_actor"] for r in ranks] == [True, False]  # saving gathers to rank 0 alone
    _assert_collectives_on_served_devices(ranks)
    if strategy in ("ddp", "fsdp2"):
        # gradients are communicated once per optimizer step: each step's critic pass and actor pass have two
        # micro-batches each, and only the second backward of each all-reduces (DDP) or reduce-scatters (FSDP2)
        for r in ranks:
            for step in r["steps"]:
                comms = step["backward_comms"]
                assert len(comms) == 4 and comms[0] == comms[2] == 0 and comms[1] > 0 and comms[3] > 0, comms


@pytest.mark.parametrize("strategy", RESUMED)
def test_torchrun_resumes_to_the_same_step(launches, strategy):
    """``torchrun ... -m vapo_pl.cli fit ... --ckpt_path step2.ckpt`` restores step 2 (the FSDP2 run carries a
    reference model whose weights are not in the checkpoint) and its step 3 is bit-identical to the unbroken run's.
    (DDP's torchrun resume is the two-node start, ``test_other_launchers_resume_what_lightnings_launcher_trained``.)"""
    fresh = launches[f"{strategy}/lightning"].ranks()
    resumed = launches[f"{strategy}/torchrun_resume"].ranks()
    _assert_ranks_agree(resumed, 1)
    assert resumed[0]["start"]["actor"] == fresh[0]["steps"][1]["actor"]  # restored step 2
    assert resumed[0]["start"]["critic"] == fresh[0]["steps"][1]["critic"]
    assert resumed[0]["steps"][0] == fresh[0]["steps"][2]
    assert resumed[0]["env"]["RANK"] == "0" and resumed[1]["env"]["RANK"] == "1"  # torchrun's own
    _assert_collectives_on_served_devices(resumed)


def test_hf_engine_on_a_sharded_actor_keeps_the_ranks_in_step(launches):
    """``data.engine.kind: hf`` under FSDP2 generates with the sharded actor itself: with ``synced_gpus`` and evened-out
    evaluation calls (rank 0 evaluates 2 problems, rank 1 one) the run finishes instead of hanging in a gather."""
    ranks = launches["fsdp2_hf/lightning"].ranks()
    assert {r["strategy"] for r in ranks} == {"FSDP2Strategy"}
    _assert_ranks_agree(ranks, STEPS, engine="HFEngine")


def test_zero3_value_pretraining_loads_a_saved_critic(launches):
    """ZeRO-3 ``ValuePretraining(load_path=...)`` fills the partitioned critic with the file's weights (the ZeRO-2 run
    saved them after its pretraining step)."""
    zero2 = launches["deepspeed_zero2/lightning"].ranks()
    ranks = launches["deepspeed_zero3/lightning"].ranks()
    saved = torch.load(launches["_critic"], weights_only=True)
    assert digest(saved.items()) == zero2[0]["start"]["critic"]  # what the ZeRO-2 run had after pretraining
    assert ranks[0]["start"]["critic"] == digest(saved.items())
    assert ranks[1]["start"]["critic"] == digest(saved.items())


def test_tensor_parallel_engine_over_two_ranks(launches):
    """``--data.init_args.engine.tensor_parallel_size 2``: both ranks run one vLLM engine (they submit the same
    prompts and seeds), each trains on its half of the rollouts, and the ranks' weights stay identical."""
    ranks = launches["ddp_tp2/lightning"].ranks()
    _assert_ranks_agree(ranks, STEPS)
    assert all(r["tensor_parallel_size"] == 2 for r in ranks)
    for step in range(STEPS):
        a, b = ranks[0]["prompts"][step], ranks[1]["prompts"][step]
        assert len(a) == len(b) == 2 and not set(a) & set(b)  # 4 prompts per step: two for each rank
    _assert_collectives_on_served_devices(ranks)


@pytest.mark.parametrize("how", ["slurm", "two_nodes"])
def test_other_launchers_resume_what_lightnings_launcher_trained(launches, how):
    """SLURM-style and two-node (torchrun) starts resume the one-node DDP run's step-2 checkpoint: they restore step 2
    and train step 3 bit for bit as the unbroken run did, ending with the same weights; in the two-node run global
    rank 1 is local rank 0 on node 1."""
    ranks = launches[f"ddp/{how}"].ranks()
    _assert_ranks_agree(ranks, 1)
    reference = launches["ddp/lightning"].ranks()
    assert ranks[0]["start"]["actor"] == reference[0]["steps"][1]["actor"]  # restored step 2
    assert ranks[0]["start"]["critic"] == reference[0]["steps"][1]["critic"]
    assert ranks[0]["steps"][0] == reference[0]["steps"][2]
    final = torch.load(launches[f"ddp/{how}"].run / "probe" / "actor_final.pt", weights_only=True)
    ref_final = torch.load(launches["ddp/lightning"].run / "probe" / "actor_final.pt", weights_only=True)
    assert final.keys() == ref_final.keys()
    assert all(torch.equal(final[k], ref_final[k]) for k in final)
    if how == "two_nodes":
        rank1 = next(r for r in ranks if r["global_rank"] == 1)
        assert (rank1["local_rank"], rank1["node_rank"]) == (0, 1)
        assert [r["env"]["RANK"] for r in sorted(ranks, key=lambda r: r["global_rank"])] == ["0", "1"]  # torchrun's
    else:
        assert [r["env"]["SLURM_PROCID"] for r in sorted(ranks, key=lambda r: r["global_rank"])] == ["0", "1"]
    _assert_collectives_on_served_devices(ranks)


def test_fsdp2_resumed_final_weights_equal_the_unbroken_runs(launches):
    """The full actor rank 0 gathers at the end (``full_state_on_rank0``, a bucket at a time) is the same tensor for
    tensor after the torchrun resume as after the unbroken FSDP2 run."""
    a = torch.load(launches["fsdp2/lightning"].run / "probe" / "actor_final.pt", weights_only=True)
    b = torch.load(launches["fsdp2/torchrun_resume"].run / "probe" / "actor_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
