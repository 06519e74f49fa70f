"""What ObfuscationPrivacy's panel needs from its logic: ``ObfuscationPrivacyLogic`` is the real one, in-app widget
tests inject a fake (``testing.FakeObfuscationPrivacyLogic``). Only these members are the widget's contract."""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

Progress = Callable[[str, Optional[float]], None]
Cancel = Callable[[], bool]


class ObfuscationPrivacyLogicProtocol(Protocol):
    def describe_key(self, key_dir) -> str:
        """One line about the key in ``key_dir``; raises MedPrivacyError when there is none."""

    def generate_key(self, key_dir, force: bool = False, vae_from=None, progress: Optional[Progress] = None,
                     cancel: Optional[Cancel] = None) -> str:
        """Create the site key (runs in a job); returns its description."""

    def node_to_frames(self, node) -> Any:
        """The node's frames (``NodeFrames``: ``pixels``, ``name``, ``index_values``); InputError if unusable."""

    def frames_to_node(self, codes, source, name: Optional[str] = None) -> Any:
        """A new node holding obfuscated frames, on ``source``'s geometry (main thread)."""

    def obfuscate_frames(self, pixels, key_dir, progress: Optional[Progress] = None) -> tuple:
        """(codes, key id) of the frames as a server would receive them (runs in a job)."""

    def test_connection(self, url: str, token: Optional[str] = None, ca_bundle: Optional[str] = None) -> str: ...

    def list_models(self, url: str, token: Optional[str] = None, ca_bundle: Optional[str] = None,
                    key_dir=None) -> list:
        """The server's models trained with this key (runs in a job)."""

    def classify_frames(self, pixels, key_dir, url: str, model: str, token: Optional[str] = None,
                        ca_bundle: Optional[str] = None, progress: Optional[Progress] = None,
                        cancel: Optional[Cancel] = None) -> dict:
        """The server's answer for the obfuscated frames (runs in a job)."""

    def train_from_folder(self, dataset, key_dir, url: str, token: Optional[str] = None,
                          ca_bundle: Optional[str] = None, steps: Optional[int] = None, name: Optional[str] = None,
                          progress: Optional[Progress] = None, cancel: Optional[Cancel] = None) -> dict:
        """Train a model on the server from a dataset folder or CSV (runs in a job)."""

    def results_table(self, answer: dict, name: str = "Obfuscated classification", frame_labels=None) -> Any:
        """A table node with one row per frame (main thread)."""
