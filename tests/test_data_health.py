"""callbacks.data_health.SkippedSamplesLogger inside a real Lightning fit on VideoDataModule batches."""

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.loggers import Logger

from callbacks.data_health import SkippedSamplesLogger
from cf.video_io import encode_mp4
from data import SKIP_REASONS, VideoDataModule


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def series(self, name):
        return [metrics[name] for _, metrics in self.rows if name in metrics]


class TinyModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        assert batch["video"].shape[1:] == (3, 5, 16, 16)
        return ((self.weight - batch["video"].mean()) ** 2).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def good(key):
    frames = np.full((5, 16, 16, 3), 100, np.uint8)
    return {"__key__": key, "mp4": encode_mp4(frames, fps=16), "txt": f"caption {key}"}


def write(path, samples):
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def fit(urls, val_urls, max_epochs=2):
    logger, health = MemoryLogger(), SkippedSamplesLogger()
    dm = VideoDataModule(train_urls=urls, val_urls=val_urls, num_frames=5, height=16, width=16, batch_size=1,
                         num_workers=0, resampled=False, shuffle_buffer=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, use_distributed_sampler=False,
                         logger=logger, callbacks=[health], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(TinyModel(), datamodule=dm)
    return logger, health, trainer


def test_skipped_samples_are_logged_cumulatively_and_summarised(tmp_path):
    no_caption = good("no_caption")
    del no_caption["txt"]
    train = write(tmp_path / "train.tar", [
        good("a"), {"__key__": "bad", "mp4": b"x" * 300, "txt": "broken"}, good("b"), no_caption,
        {"__key__": "bad2", "mp4": b"y" * 300, "txt": "broken"}, good("c"),
    ])
    val = write(tmp_path / "val.tar", [good("v0"), {"__key__": "vbad", "mp4": b"z" * 300, "txt": "x"}, good("v1")])
    with pytest.warns(UserWarning) as record:
        logger, health, trainer = fit(train, val)
    messages = [str(w.message) for w in record]
    assert any("3 training samples skipped in epoch 0" in m and "corrupt_video=2" in m for m in messages)
    assert any("3 training samples skipped in epoch 1" in m for m in messages)
    assert any("whole fit" in m and "training 6" in m and "validation 2" in m for m in messages)

    assert trainer.global_step == 6  # 3 good samples per epoch, training kept going
    corrupt = logger.series("data/skipped_corrupt_video")
    caption = logger.series("data/skipped_missing_caption")
    assert len(corrupt) == 6
    # batch a: nothing before it; batch b: 1 corrupt; batch c: 1 missing caption + 1 corrupt; then again
    assert corrupt == [0, 1, 2, 2, 3, 4]
    assert caption == [0, 0, 1, 1, 1, 2]
    assert all(logger.series(f"data/skipped_{reason}") for reason in SKIP_REASONS)  # every reason is charted
    assert logger.series("data/val_skipped_corrupt_video") == [1, 2]  # cumulative over the two validations
    assert health.state_dict() == {"train_total": {"corrupt_video": 4, "missing_caption": 2},
                                   "val_total": {"corrupt_video": 2}}
    restored = SkippedSamplesLogger()
    restored.load_state_dict(health.state_dict())
    assert restored.train_total == health.train_total


def test_clean_data_gives_no_skip_warning(tmp_path):
    train = write(tmp_path / "train.tar", [good("a"), good("b")])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger, _, _ = fit(train, None, max_epochs=1)
    assert not [w for w in record if "skipped" in str(w.message)]
    assert logger.series("data/skipped_corrupt_video") == [0, 0]
