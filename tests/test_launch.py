"""Launch scripts (launch/) and the SLURM sweep launcher config (trainer/conf/hydra/launcher/slurm.yaml).

Dry runs check the exact commands for 2 nodes x 8 GPUs; the slow tests really launch on CPU/gloo:
two simulated nodes meeting at a c10d rendezvous on localhost (with a crash, an elastic restart and
a resume), the DeepSpeed launcher, and a Hydra sweep through submitit's local executor.
"""

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, make_shardset

LAUNCH = REPO / "launch"
SCRIPTS = ["torchrun.sh", "torchrun_multinode.sh", "slurm.sbatch", "deepspeed.sh"]
OVERRIDES = ["model=gpt2_124m", "mixture.weights={code: 0.5, books: 0.5}"]  # one with spaces and braces


def _env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            (
                "SLURM_",
                "RUN_",
                "NNODES",
                "NODE_RANK",
                "MASTER_",
                "RDZV_",
                "NPROC_",
                "GPUS_",
                "HOSTFILE",
                "NO_SSH",
                "NODELIST",
                "MAX_RESTARTS",
                "CONTAINER_",
                "ENGINE",
                "TORCH_DISABLE_SHARE_RDZV",
            )
        )
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # torchrun/deepspeed of this venv
    return {**env, **{k: str(v) for k, v in extra.items()}}


def _dry(script: str, *args: str, **env) -> list[list[str]]:
    """The command lines a script prints with --dry-run, each split as the shell would."""
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), "--dry-run", *args],
        env=_env(**env),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [
        shlex.split(line.split(": ", 1)[1] if line.startswith("# node") else line)
        for line in proc.stdout.splitlines()
        if line.strip() and (not line.startswith("#") or line.startswith("# node"))
    ]


def _after_module(cmd: list[str], module_flag: str) -> list[str]:
    i = cmd.index(module_flag)
    assert cmd[i + 1 : i + 3] == ["trainer.cli", "train"], cmd
    return cmd[i + 3 :]


def _run_dir(cmd: list[str]) -> str:
    dirs = [a.split("=", 1)[1] for a in cmd if a.startswith("hydra.run.dir=")]
    assert len(dirs) == 1, cmd
    return dirs[0]


def test_every_script_parses():
    for name in SCRIPTS:
        subprocess.run(["bash", "-n", str(LAUNCH / name)], check=True)
        head = (LAUNCH / name).read_text().splitlines()[:12]
        assert head[0] == "#!/usr/bin/env bash" and head[1].startswith("# "), name  # a usage comment first
        assert any("--dry-run" in line for line in head), name
        assert os.access(LAUNCH / name, os.X_OK) or name.endswith(".sbatch"), name


def test_torchrun_single_node():
    (cmd,) = _dry("torchrun.sh", "8", *OVERRIDES, RUN_DIR="runs/x")
    assert cmd[:2] == ["torchrun", "--standalone"] and "--nproc-per-node=8" in cmd
    assert _after_module(cmd, "-m") == ["hydra.run.dir=runs/x", *OVERRIDES]
    (cmd,) = _dry("torchrun.sh", "2")
    assert _run_dir(cmd).startswith("runs/2")  # a timestamp, fixed once for all ranks


def test_torchrun_multinode_static():
    cmds = [
        _dry(
            "torchrun_multinode.sh",
            *OVERRIDES,
            NNODES=2,
            NODE_RANK=r,
            NPROC_PER_NODE=8,
            MASTER_ADDR="10.0.0.1",
            RUN_ID="exp1",
        )[0]
        for r in (0, 1)
    ]
    for rank, cmd in enumerate(cmds):
        assert cmd[0] == "torchrun"
        for flag in (
            "--nnodes=2",
            "--nproc-per-node=8",
            f"--node-rank={rank}",
            "--master-addr=10.0.0.1",
            "--master-port=29500",
        ):
            assert flag in cmd, (flag, cmd)
        assert _after_module(cmd, "-m") == ["hydra.run.dir=runs/mixtrain-exp1", *OVERRIDES]
    assert _run_dir(cmds[0]) == _run_dir(cmds[1])


def test_torchrun_multinode_c10d():
    cmds = [
        _dry(
            "torchrun_multinode.sh",
            *OVERRIDES,
            NNODES=2,
            NPROC_PER_NODE=8,
            RDZV_ENDPOINT="head:29400",
            RUN_ID="exp2",
            NODE_RANK=r,
        )[0]
        for r in (0, 1)
    ]
    assert cmds[0] == cmds[1]  # c10d assigns ranks: every node runs the identical command
    cmd = cmds[0]
    for flag in (
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=head:29400",
        "--rdzv-id=exp2",
        "--max-restarts=3",
    ):
        assert flag in cmd, (flag, cmd)
    assert not any(a.startswith("--node-rank") for a in cmd)
    assert _after_module(cmd, "-m") == ["hydra.run.dir=runs/mixtrain-exp2", *OVERRIDES]


def test_torchrun_scripts_use_a_store_per_restart():
    """Restarted workers must not read the dead group's addresses from a shared agent store."""
    runs = [
        ("torchrun.sh", ["2"], {}),
        ("torchrun_multinode.sh", [], dict(NNODES=2, RDZV_ENDPOINT="h:1", RUN_ID="a")),
        ("slurm.sbatch", [], dict(NODELIST="a,b")),
    ]
    for script, args, env in runs:
        out = subprocess.run(
            ["bash", str(LAUNCH / script), "--dry-run", *args],
            env=_env(**env),
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout
        assert "# env: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in out, script


def test_multinode_refuses_without_a_shared_run_id():
    proc = subprocess.run(
        ["bash", str(LAUNCH / "torchrun_multinode.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=_env(NNODES=2, NODE_RANK=0, MASTER_ADDR="h"),
        cwd=REPO,
    )
    assert proc.returncode == 2 and "RUN_ID" in proc.stderr
    proc = subprocess.run(
        ["bash", str(LAUNCH / "torchrun_multinode.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=_env(NNODES=2, RUN_ID="a"),
        cwd=REPO,
    )
    assert proc.returncode == 2 and "NODE_RANK" in proc.stderr


def _check_slurm(lines: list[list[str]], head: str, job: str):
    srun, *nodes = lines
    assert srun[0] == "srun" and "--nodes=2" in srun and "--ntasks-per-node=1" in srun
    torchrun = srun[srun.index("torchrun") :]
    for flag in (
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={head}:29500",
        f"--rdzv-id={job}",
    ):
        assert flag in torchrun, (flag, torchrun)
    assert _after_module(torchrun, "-m") == [f"hydra.run.dir=runs/mixtrain-{job}", *OVERRIDES]
    assert len(nodes) == 2 and nodes[0] == nodes[1] == torchrun  # what each node runs: one run dir for all
    return srun


def test_slurm_dry_run_without_slurm():
    lines = _dry("slurm.sbatch", *OVERRIDES, NODELIST="gpu-a,gpu-b", GPUS_PER_NODE=8, SLURM_JOB_ID=123)
    _check_slurm(lines, "gpu-a", "123")
    text = (LAUNCH / "slurm.sbatch").read_text()
    for directive in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8"):
        assert directive in text


def test_slurm_dry_run_with_scontrol(tmp_path):
    """Inside an allocation the node list comes from `scontrol show hostnames` (a stub here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text(
        '#!/usr/bin/env bash\n[[ "$1 $2 $3" == "show hostnames node[001-002]" ]] && printf "node001\\nnode002\\n"\n'
    )
    stub.chmod(0o755)
    env = dict(
        SLURM_JOB_NODELIST="node[001-002]",
        SLURM_JOB_NUM_NODES=2,
        SLURM_GPUS_ON_NODE=8,
        SLURM_JOB_ID=42,
        SLURM_SUBMIT_DIR=REPO,
        CONTAINER_IMAGE="/images/mixtrain.sqsh",
        CONTAINER_MOUNTS="/data:/data",
    )
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{_env()['PATH']}"}
    srun = _check_slurm(_dry("slurm.sbatch", *OVERRIDES, **env), "node001", "42")
    assert "--container-image=/images/mixtrain.sqsh" in srun and "--container-mounts=/data:/data" in srun


def test_deepspeed_launcher_dry_run():
    (cmd,) = _dry(
        "deepspeed.sh", *OVERRIDES, HOSTFILE="launch/hostfile.example", NNODES=2, GPUS_PER_NODE=8, RUN_ID="ds1"
    )
    assert cmd[0] == "deepspeed"
    for flag in ("--hostfile=launch/hostfile.example", "--num_nodes=2", "--num_gpus=8", "--no_local_rank"):
        assert flag in cmd, (flag, cmd)
    assert _after_module(cmd, "--module") == ["engine=deepspeed", "hydra.run.dir=runs/mixtrain-ds1", *OVERRIDES]
    per_node = [
        _dry(
            "deepspeed.sh",
            *OVERRIDES,
            HOSTFILE="launch/hostfile.example",
            NNODES=2,
            GPUS_PER_NODE=8,
            RUN_ID="ds1",
            NO_SSH=1,
            NODE_RANK=r,
            MASTER_ADDR="10.0.0.1",
        )[0]
        for r in (0, 1)
    ]
    for rank, cmd in enumerate(per_node):
        assert {"--no_ssh", f"--node_rank={rank}", "--master_addr=10.0.0.1"} <= set(cmd)
    assert _run_dir(per_node[0]) == _run_dir(per_node[1]) == "runs/mixtrain-ds1"


def test_deepspeed_flags_and_hostfile_are_real():
    """The flags exist in the installed launcher, and its own parser accepts the example hostfile."""
    from deepspeed.launcher.runner import _parse_hostfile, parse_args

    (cmd,) = _dry(
        "deepspeed.sh",
        "x=1",
        HOSTFILE="launch/hostfile.example",
        NNODES=2,
        GPUS_PER_NODE=8,
        RUN_ID="r",
        NO_SSH=1,
        NODE_RANK=1,
        MASTER_ADDR="h",
    )
    args = parse_args(cmd[1:])
    assert args.module and args.no_local_rank and args.no_ssh and args.node_rank == 1 and args.num_gpus == 8
    assert args.user_script == "trainer.cli" and args.user_args[:2] == ["train", "engine=deepspeed"]
    pool = _parse_hostfile((LAUNCH / "hostfile.example").read_text().splitlines())
    assert dict(pool) == {"worker-1": 8, "worker-2": 8}


def test_torchrun_flags_are_real():
    from torch.distributed.run import get_args_parser

    for cmd in (
        _dry("torchrun_multinode.sh", "x=1", NNODES=2, NPROC_PER_NODE=8, RDZV_ENDPOINT="h:1", RUN_ID="a")[0],
        _dry("torchrun_multinode.sh", "x=1", NNODES=2, NPROC_PER_NODE=8, NODE_RANK=1, MASTER_ADDR="h", RUN_ID="a")[0],
        _dry("torchrun.sh", "8", "x=1")[0],
    ):
        args = get_args_parser().parse_args(cmd[1:])
        assert args.nproc_per_node == "8" and args.module and args.training_script == "trainer.cli"


# ---- Hydra SLURM launcher ---------------------------------------------------------------------


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    from hydra import compose, initialize_config_dir

    from trainer import schema

    schema.register()  # config.yaml starts from the structured schema

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "trainer" / "conf")):
        cfg = compose(
            "config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (1, 1, 1, "gpu")
    assert launcher.timeout_min > 0 and launcher.max_num_timeout == 0


# ---- real launches on CPU (gloo) --------------------------------------------------------------

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.steps_per_shard=3",
    "data.eval_sequences=4",
    "train.steps=4",
    "train.micro_batch=4",
    "train.warmup_steps=1",
    "train.eval_every=4",
    "run.wandb=disabled",
    "run.plots=false",
    "run.progress=false",
    "engine.threads=1",
]


def _tiny(data: Path) -> list[str]:
    return ["data=shards", f"data.path={data}", *TINY]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_c10d_restart_and_resume(tmp_path):
    """Two 'nodes' (one process each) meet at a c10d rendezvous; both crash after step 2, torchrun
    restarts the group, and the run resumes from the step-2 checkpoint in the same run dir."""
    data = make_shardset(tmp_path / "data")
    run_dir = tmp_path / "run"
    env = _env(
        NNODES=2,
        NPROC_PER_NODE=1,
        RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}",
        RUN_ID="t",
        RUN_DIR=run_dir,
        MAX_RESTARTS=1,
        OMP_NUM_THREADS=1,
        PYTHONPATH=REPO,
    )
    args = [
        "bash",
        str(LAUNCH / "torchrun_multinode.sh"),
        *_tiny(data),
        "train.fail_at_step=2",
        "train.checkpoint_every=2",
    ]
    nodes = [
        subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    log = "".join(logs)
    assert "2 rank(s)" in log and "resumed from" in log and "at step 2" in log and "done: 4 steps" in log
    assert (run_dir / "weights.json").is_file() and (run_dir / "checkpoints").is_dir()


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_cli(tmp_path):
    """The DeepSpeed launcher (--module, --no_local_rank) starts 2 CPU ranks of `trainer.cli train`."""
    data = make_shardset(tmp_path / "data")
    env = _env(
        ENGINE="torch",
        GPUS_PER_NODE=2,
        RUN_DIR=tmp_path / "run",
        MASTER_PORT=_free_port(),
        OMP_NUM_THREADS=1,
        PYTHONPATH=REPO,
    )
    proc = subprocess.run(
        ["bash", str(LAUNCH / "deepspeed.sh"), *_tiny(data)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and (tmp_path / "run" / "weights.json").is_file()


@pytest.mark.slow
def test_sweep_through_submitit(tmp_path):
    """`mixtrain train -m` through submitit's local executor: the code path of hydra/launcher=slurm
    (pickled app, one job per sweep point) without a cluster."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    data = make_shardset(tmp_path / "data")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.cli",
            "train",
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=5",
            f"hydra.sweep.dir={sweep}",
            *_tiny(data),
            "train.steps=2",
            "train.seed=1,2",
        ],
        env=_env(OMP_NUM_THREADS=1, PYTHONPATH=REPO),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all((sweep / job / "weights.json").is_file() for job in ("0", "1"))
