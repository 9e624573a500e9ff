"""Every launch script's dry run prints the commands it would run (nothing is executed)."""
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

MAIN_ARGS = ["--config=experiments/gpt_small.py", "--workdir=/shared/runs/gpt",
             "--config.train.steps=10"]


def _run(argv, **env):
  proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env={**os.environ, **env})
  return proc


def _commands(stdout):
  """The '+ cmd' lines of a dry run, split into argv lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_local_launcher_dry_run():
  proc = _run([sys.executable, "launch/local.py", "--num_processes=3", "--devices_per_process=2",
               "--port=4321", "--dry-run", "--", "python", "-m", "llmjax.main", *MAIN_ARGS])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 3
  for rank, line in enumerate(lines):
    argv = shlex.split(line)
    assert argv[:2] == ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
    assert argv[3:5] == ["-m", "llmjax.main"] and argv[5:8] == MAIN_ARGS
    assert argv[8:] == ["--coordinator_address=127.0.0.1:4321", "--num_processes=3",
                        f"--process_id={rank}"]


def test_local_launcher_requires_a_command():
  proc = _run([sys.executable, "launch/local.py", "--dry-run"])
  assert proc.returncode == 2 and "give the command after --" in proc.stderr


def test_tpu_pod_dry_run_creates_installs_runs_on_all_workers():
  proc = _run(["bash", "launch/tpu_pod.sh", "--dry-run", "--name=pod1", "--zone=us-east5-a",
               "--accelerator=v5p-64", "--spot", "--", *MAIN_ARGS])
  assert proc.returncode == 0, proc.stderr
  cmds = _commands(proc.stdout)
  assert "describe pod1 --zone=us-east5-a" in proc.stdout  # reuse when it exists
  create, archive, scp, install, train = cmds
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", "--zone=us-east5-a",
                    "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"]
  assert archive[0] == "git" and "archive" in archive
  assert scp[4] == "scp" and "--worker=all" in scp
  assert "--worker=all" in install and "jax[tpu]" in install[-1] and "pip install" in install[-1]
  assert train[4] == "ssh" and "--worker=all" in train
  remote = train[-1].split("=", 1)[1]
  assert "python -m llmjax.main " + " ".join(MAIN_ARGS) in remote and "tee ~/llmjax.log" in remote


def test_tpu_pod_detach_streams_worker0_log_and_validates_options():
  proc = _run(["bash", "launch/tpu_pod.sh", "--dry-run", "--name=pod1", "--zone=z",
               "--accelerator=v5litepod-16", "--detach", "--delete", "--", *MAIN_ARGS])
  assert proc.returncode == 0, proc.stderr
  cmds = _commands(proc.stdout)
  assert "--version=v2-alpha-tpuv5-lite" in cmds[0]
  assert "nohup python -m llmjax.main" in cmds[-3][-1]
  assert "--worker=0" in cmds[-2] and "tail" in cmds[-2][-1]
  assert cmds[-1][4] == "delete"
  missing = _run(["bash", "launch/tpu_pod.sh", "--dry-run", "--zone=z", "--accelerator=v4-32",
                  "--", *MAIN_ARGS])
  assert missing.returncode == 2 and "--name is required" in missing.stderr


def test_xpk_dry_run_multislice_puts_data_on_dcn():
  proc = _run(["bash", "launch/gke_xpk.sh", "--dry-run", "--cluster=c1", "--tpu_type=v5p-128",
               "--num_slices=2", "--image=gcr.io/p/llmjax:1", "--workload=w1", "--", *MAIN_ARGS])
  assert proc.returncode == 0, proc.stderr
  build, push, create = _commands(proc.stdout)
  assert build[:2] == ["docker", "build"] and push == ["docker", "push", "gcr.io/p/llmjax:1"]
  assert create[:3] == ["xpk", "workload", "create"]
  assert {"--cluster=c1", "--workload=w1", "--tpu-type=v5p-128", "--num-slices=2",
          "--docker-image=gcr.io/p/llmjax:1"} <= set(create)
  command = [a for a in create if a.startswith("--command=")][0].split("=", 1)[1]
  assert command == "python -m llmjax.main " + " ".join(MAIN_ARGS) + " --config.mesh.dcn.data=2"


def test_slurm_dry_run_one_task_per_node_fsdp_inside_data_across():
  text = (ROOT / "launch" / "slurm.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=8" in text
  proc = _run(["bash", "launch/slurm.sbatch", *MAIN_ARGS], DRY_RUN="1", SLURM_JOB_NUM_NODES="4")
  assert proc.returncode == 0, proc.stderr
  (srun,) = _commands(proc.stdout)
  assert srun[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert srun[3:6] == ["python", "-m", "llmjax.main"] and srun[6:9] == MAIN_ARGS
  assert srun[9:] == ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.dcn.data=4"]
  own = _run(["bash", "launch/slurm.sbatch", *MAIN_ARGS, "--config.mesh.tensor=8"],
             DRY_RUN="1", SLURM_JOB_NUM_NODES="4")
  assert _commands(own.stdout)[0][9:] == ["--config.mesh.tensor=8"]


def test_skypilot_yaml_run_block_dry_run():
  spec = yaml.safe_load((ROOT / "launch" / "skypilot.yaml").read_text())
  assert spec["num_nodes"] >= 2 and "accelerators" in spec["resources"]
  assert "pip install -e ." in spec["setup"]
  env = {k: str(v) for k, v in spec["envs"].items()}
  env.update(DRY_RUN="1", SKYPILOT_NODE_IPS="10.0.0.5\n10.0.0.6", SKYPILOT_NUM_NODES="2",
             SKYPILOT_NODE_RANK="1", EXTRA_ARGS="--config.train.steps=10")
  proc = _run(["bash", "-c", spec["run"]], **env)
  assert proc.returncode == 0, proc.stderr
  argv = proc.stdout.split()
  assert argv[:3] == ["python", "-m", "llmjax.main"]
  assert {"--config=experiments/gpt_small.py", "--coordinator_address=10.0.0.5:8476",
          "--num_processes=2", "--process_id=1", "--config.mesh.dcn.data=2"} <= set(argv)
  assert argv[-1] == "--config.train.steps=10"  # user overrides come last and win


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gke_xpk.sh", "slurm.sbatch", "common.sh"])
def test_scripts_are_valid_bash(script):
  assert _run(["bash", "-n", f"launch/{script}"]).returncode == 0
