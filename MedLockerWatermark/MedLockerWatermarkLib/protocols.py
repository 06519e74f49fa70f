"""What MedLockerWatermark's panel needs from its logic: ``MedLockerWatermarkLogic`` is the real one, in-app widget
tests inject a fake (``testing.FakeMedLockerWatermarkLogic``). Only these members are the widget's contract."""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

Progress = Callable[[str, Optional[float]], None]
Cancel = Callable[[], bool]


class MedLockerWatermarkLogicProtocol(Protocol):
    #: The session's key (``len`` = images in it), the file it was loaded from or exported to, and how many
    #: protected images are not in an exported file yet.
    key: Any
    key_path: Any
    unsaved: int

    def slice_count(self, volume_node) -> int: ...

    def slice_index_at(self, volume_node, ras) -> int: ...

    def load_logo(self, path=None) -> Any: ...

    def prepare_protection(
        self,
        volume_node,
        slice_index=None,
        logo=None,
        settings=None,
        lesion_source: str = "server",
        segmentation_node=None,
        segment_ids=None,
    ) -> tuple:
        """(image, logo, settings, lesion mask or None), checked before any upload (main thread)."""

    def compute_protection(
        self,
        image,
        logo,
        settings,
        url: str,
        token: Optional[str] = None,
        ca_bundle: Optional[str] = None,
        lesion_source: str = "server",
        mask=None,
        progress: Optional[Progress] = None,
        cancel: Optional[Cancel] = None,
    ) -> Any:
        """The server's watermark search for one image (a ``BackgroundJob`` thread: one request)."""

    def apply_protection(self, computed, reference_node, name: Optional[str] = None) -> Any:
        """Put the protected image into the scene; returns a ``ProtectionResult`` (main thread)."""

    def test_connection(self, url: str, token: Optional[str] = None, ca_bundle: Optional[str] = None) -> str: ...

    def list_models(self, url: str, token: Optional[str] = None, ca_bundle: Optional[str] = None) -> tuple:
        """(classifiers, segmenters) held by the server (a short call: a ``BackgroundJob`` thread)."""

    def export_key(self, path, passphrase: Optional[str] = None, key_file=None, **options) -> Any: ...

    def load_key(self, path, passphrase: Optional[str] = None, key_file=None) -> Any: ...

    def new_key(self) -> None: ...

    def generate_key_file(self, path) -> Any: ...

    def verify(self, volume_node, slice_index=None) -> Any:
        """The key entry the image matches, or None."""

    def unlock(self, volume_node, slice_index=None, name: Optional[str] = None) -> Any:
        """A new node with the original restored bit for bit."""

    def start_folder_protection(
        self,
        input_dir,
        output_dir,
        key_path,
        url: str,
        *,
        on_progress: Optional[Progress] = None,
        on_done: Optional[Callable[[Any], None]] = None,
        on_error: Optional[Callable[[str, str], None]] = None,
        **options,
    ) -> Any:
        """Start protecting every image file of a folder in a worker process; returns the worker (``cancel()``).
        ``on_done(DatasetResult)``, or ``on_error(one-line message, kind)``, from Qt's event loop."""
