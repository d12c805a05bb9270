"""Video logging to TensorBoard without moviepy: GIF image summaries read back with EventAccumulator."""

import io

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from callbacks.video_logger import VideoLogger, log_video, video_to_frames
from cf.video_io import read_video


def colour_video(num_frames=6, height=16, width=24):
    """Float [3, T, H, W] in [-1, 1]: frame t is flat, with a red level that grows with t."""
    video = -torch.ones(3, num_frames, height, width)
    for t in range(num_frames):
        video[0, t] = -1 + 2 * t / (num_frames - 1)
    return video


def read_images(log_dir):
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


def test_log_video_writes_an_animated_gif_summary_and_an_mp4(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    video = colour_video()
    mp4 = log_video(writer, "val/sample", video, step=7, fps=8)
    writer.close()
    events = read_images(tmp_path)
    assert "val/sample" in events.Tags()["images"]
    (event,) = events.Images("val/sample")
    assert event.step == 7 and (event.width, event.height) == (24, 16)
    with Image.open(io.BytesIO(event.encoded_image_string)) as gif:
        assert gif.format == "GIF" and gif.n_frames == 6
        reds = [np.asarray(frame.convert("RGB"))[0, 0, 0] for frame in ImageSequence.Iterator(gif)]
    expected = video_to_frames(video)[:, 0, 0, 0]
    assert np.abs(np.array(reds, int) - expected.astype(int)).max() <= 8  # GIF palette quantisation
    frames, fps = read_video(mp4)
    assert frames.shape == (6, 16, 24, 3) and fps == pytest.approx(8)
    assert mp4.parent == tmp_path / "videos"


def test_batches_are_tiled_and_previews_downscaled(tmp_path):
    batch = torch.stack([colour_video(), -colour_video()])  # [2, 3, T, H, W]
    frames = video_to_frames(batch)
    assert frames.shape == (6, 16, 48, 3)
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_video(writer, "tiled", batch, step=0, max_side=24, write_mp4=False)
    writer.close()
    (event,) = read_images(tmp_path).Images("tiled")
    assert (event.width, event.height) == (24, 8)
    assert not (tmp_path / "videos").exists()
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        video_to_frames(torch.zeros(4, 6, 8, 8))


class VideoModule(pl.LightningModule):
    """Returns sample videos from validation_step and also stores one in videos_to_log."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.videos_to_log = {}

    def validation_step(self, batch, batch_idx):
        self.videos_to_log["val/rollout"] = colour_video(num_frames=5)
        return {"videos": torch.stack([colour_video(), colour_video()])}


def test_video_logger_callback_logs_module_videos(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[VideoLogger(fps=4, max_batches=1)],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    module = VideoModule()
    trainer.validate(module, DataLoader(TensorDataset(torch.zeros(3, 1)), batch_size=1), verbose=False)
    logger.experiment.flush()
    tags = read_images(logger.log_dir).Tags()["images"]
    assert sorted(tags) == ["val/rollout", "val/video/batch0"]  # one batch only, as configured
    assert module.videos_to_log == {}
    assert sorted(p.name for p in (tmp_path / "run" / "version_0" / "videos").glob("*.mp4")) == [
        "val_rollout_step00000000.mp4", "val_video_batch0_step00000000.mp4"]
