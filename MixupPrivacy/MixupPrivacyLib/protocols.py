"""What MixupPrivacy's panel needs from its logic: ``MixupPrivacyLogic`` is the real one, in-app widget tests inject
a fake (``testing.FakeMixupPrivacyLogic``). Only these members are the widget's contract with the logic."""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

Progress = Callable[[str, Optional[float]], None]


class MixupPrivacyLogicProtocol(Protocol):
    #: Volume nodes added by the last ``apply_result``: what the server received, and what it could rebuild.
    last_uploaded_node: Any
    last_rebuild_node: Any

    def volume_node_to_sitk(self, volume_node) -> Any:
        """The node as a SimpleITK image; raises InputError for anything that cannot be segmented."""

    def test_connection(self, url: str, token: Optional[str] = None, ca_bundle: Optional[str] = None) -> str:
        """One line describing the server (runs in a job)."""

    def generate_key(self, key_dir, progress: Optional[Progress] = None, force: bool = False, **options) -> Any:
        """Create the private key in ``key_dir`` (runs in a job)."""

    def compute(self, input_sitk, url: str, token: Optional[str] = None, ca_bundle: Optional[str] = None,
                key_dir=None, tta: Optional[int] = None, unmix: str = "learned", keep_uploaded: bool = False,
                progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
                seed: Optional[int] = None, privacy: Optional[str] = None, rebuild: bool = False) -> Any:
        """The private segmentation of ``input_sitk`` (runs in a job; touches no MRML)."""

    def apply_result(self, result, input_node, output_segmentation_node=None, show_uploaded: bool = False) -> Any:
        """Put ``compute``'s result into the scene; returns the segmentation node (main thread)."""
