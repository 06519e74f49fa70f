"""What one Mixup-Privacy training run does (``TrainConfig``): architectures, schedule, data and sampling, with the
named presets (``cpu-small``, ``gpu-paper``, ``smoke``) that ``medprivacy mixup train --preset`` starts from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..labels import NUM_CLASSES
from .mixing import DEFAULT_LAMBDA_RANGE


@dataclass
class TrainConfig:
    arch: str = "unet"  # "unet" (small, CPU) or "unetplusplus" (the paper's U-Net++)
    channels: tuple = (16, 32, 64, 128)
    patch_size: int = 32
    unmix_features: int = 8
    iterations: int = 3000
    batch_size: int = 8
    learning_rate: float = 1e-3
    lambda_range: tuple = DEFAULT_LAMBDA_RANGE
    train_subjects: int = 16
    validation_subjects: int = 1
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: leave torch's default
    save_every: int = 250
    validate_every: int = 250
    dataset: str | None = None  # nnU-Net/MSD folder; None: synthetic subjects from the MNI152 template
    init_from: str | None = None  # models folder to continue from (a second stage with a fresh LR schedule)
    deformation: float = 1.0
    #: 1: references uniform over mostly-brain positions (how the first stage was trained). keygen keeps the most
    #: textured of TEXTURE_OVERSAMPLING draws, so a later stage passes that number to train on what clients send.
    reference_oversampling: int = 1
    #: Validation subjects on which the decision weights are fitted once training ends (calibrate.py); 0 skips.
    calibration_subjects: int = 4
    #: End after this many steps of the ``iterations``-long schedule (reproduces a stage that was cut short).
    stop_after: int | None = None
    #: How targets are drawn (the first four stages: "box", inside the analysis box with a left-right flip, references
    #: flipped). "private": as the privacy levels cut them (privacy.py): anywhere a patch touches the analysis region,
    #: past the volume's edge too, turned by any of the 48 cube symmetries, voxels without signal filled with
    #: reference texture with probability ``fill_probability``, and sampled through a random smooth deformation of up
    #: to ``warp_rms`` voxels RMS; references turned by any of the 48 symmetries.
    target_sampling: str = "box"
    fill_probability: float = 0.0
    warp_rms: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        if name == "cpu-small":
            return cls()
        if name == "gpu-paper":
            # Sec. 4: U-Net++ segmenter, Adam, batch 4, 200k iterations; 64³ patches on a GPU.
            return cls(
                arch="unetplusplus",
                patch_size=64,
                iterations=200_000,
                batch_size=4,
                train_subjects=64,
                save_every=5000,
                validate_every=5000,
            )
        if name == "smoke":
            return cls(
                channels=(4, 8, 16),
                patch_size=16,
                unmix_features=4,
                iterations=3,
                batch_size=2,
                train_subjects=1,
                save_every=0,
                validate_every=3,
                deformation=0.3,
                calibration_subjects=0,
            )
        raise ValueError(f"unknown preset {name!r}; use cpu-small, gpu-paper or smoke")

    def segmentation_arch(self) -> dict:
        if self.arch == "unet":
            return {
                "name": "unet",
                "in_channels": 1,
                "out_channels": NUM_CLASSES,
                "channels": list(self.channels),
                "strides": [2] * (len(self.channels) - 1),
                "num_res_units": 1,
            }
        if self.arch == "unetplusplus":
            return {
                "name": "unetplusplus",
                "in_channels": 1,
                "out_channels": NUM_CLASSES,
                "features": [32, 32, 64, 128, 256, 32],
            }
        raise ValueError(f"unknown architecture {self.arch!r}; use unet or unetplusplus")
