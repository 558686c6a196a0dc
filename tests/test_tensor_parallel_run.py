"""The launcher ``torchrun --nproc_per_node=2 -m moelora.parallel.run`` on CPU with gloo (issue 18):
train a fresh block-diagonal LoRA a few steps and save it, generate with the saved adapter, each
checked against the unsharded model; a form that does not fit the adapter is one line, exit 2."""
import os
import signal
import subprocess
import sys

import pytest
from gloo_ranks import free_port

import moelora


def _torchrun(*args, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "moelora.parallel.run", *args]
    # a new session, so that a timeout ends the workers with the launcher (killpg below)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_train_save_and_generate_under_tensor_parallelism(tmp_path):
    out = tmp_path / "adapter"
    res = _torchrun("--model", "tiny", "--adapter", "bdlora", "--lora-rank", "4", "--task", "train", "--steps", "2",
                    "--lr", "0.05", "--save", str(out), "--check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "check against the unsharded model: equal" in res.stdout
    assert "step 2/2" in res.stdout
    cfg, _ = moelora.read_adapter_config(out)
    assert cfg.method == "bdlora" and cfg.nblocks == 2
    res = _torchrun("--model", "tiny", "--adapter", str(out), "--max-new-tokens", "4", "--check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "check against the unsharded model: equal" in res.stdout


def test_a_form_that_does_not_fit_is_one_line():
    res = _torchrun("--model", "tiny", "--adapter", "bdlora", "--form", "slora")
    assert res.returncode != 0
    assert "moelora.parallel.run: error: form 'slora' shards 'lora' adapters" in res.stdout
    assert "Traceback" not in res.stdout
