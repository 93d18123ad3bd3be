"""Two CPU processes under torchrun (gloo): sharded data, synchronised weights, one checkpoint writer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = """
import hashlib, json, sys
from pathlib import Path
import torch
sys.path.insert(0, {helpers!r})
from train_helpers import tiny_config
from wedetect.train.loop import Trainer

torch.set_num_threads(1)
data = {{k: Path(v) for k, v in json.loads({data!r}).items()}}
data["names"] = json.loads(data["classes"].read_text(encoding="utf-8"))
out = Path({out!r})
trainer = Trainer(tiny_config(data, out, epochs=1, max_iters_per_epoch=None, batch_size=4, val_interval=5),
                  progress=False)
trainer.fit()
flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
(out / f"rank{{trainer.dist.rank}}.json").write_text(json.dumps({{
    "world": trainer.dist.world_size, "iters": trainer.iters_per_epoch, "steps": trainer.state.step,
    "hash": hashlib.sha1(flat.numpy().tobytes()).hexdigest(),
}}))
"""


@pytest.mark.slow
def test_two_process_gloo_training(synth_data: dict, tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    paths = {k: str(v) for k, v in synth_data.items() if k in ("train", "val", "classes", "tokenizer", "root")}
    script = tmp_path / "ddp_run.py"
    out = tmp_path / "run"
    script.write_text(SCRIPT.format(helpers=str(Path(__file__).parent), data=json.dumps(paths), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
         str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert all(r["iters"] == 6 and r["steps"] == 6 for r in ranks)  # 48 images / 2 ranks / 4 per batch
    assert ranks[0]["hash"] == ranks[1]["hash"]  # DDP kept the replicas identical
    ckpt = torch.load(out / "epoch_1.pth", map_location="cpu", weights_only=True)
    assert ckpt["meta"]["iter"] == 6
