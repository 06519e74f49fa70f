"""Shared pytest fixtures: tiny server models, a real inference server in a subprocess, a self-signed certificate.

Nothing here mocks our server: ``start_server`` runs ``python -m medprivacy.cli serve`` on 127.0.0.1 and tests talk
to it over real HTTP(S).

Fixtures and helpers
--------------------
``tiny_models_dir`` (session)
    Folder with ``manifest.json`` holding "mixup-seg" and "plain-seg": seeded random 3-level U-Nets, patch size
    16³, 4 classes. Good for transport mechanics only; their segmentations mean nothing.
``start_server(args, env=None, *, models_dir=None, token=None, ca_bundle=None, cwd=None)`` -> ``ServerHandle``
    Starts a server on a free port and waits until ``/v1/health`` answers (``launch_server`` takes the same
    arguments and returns at once, so several startups can overlap; then ``handle.wait_ready()``). Use it as a
    context manager (``with start_server([...]) as server:``) or call ``server.stop()``. ``models_dir`` adds
    ``--models-dir`` (e.g. the shipped ``Resources/Models``), ``token`` writes a 0600 token file and adds
    ``--token-file``, ``--ssl-certfile`` in ``args`` switches the URL to https, and ``ca_bundle`` is what
    ``server.client()`` trusts.
``server_factory`` (function scope)
    ``server_factory(args, **same keywords)``: like ``start_server`` but stopped when the test ends.
``live_server`` (session; started together with ``live_server_with_token``)
    Tiny models, no token, ``--enable-baseline``, ``--audit-dir`` (``server.audit_dir``; the folder is shared by all
    tests of the session, so compare ``server.audit_files()`` before and after).
``live_server_with_token`` (session)
    Tiny models, token ``server.token``, no baseline, no audit dir; runs in an empty working directory
    (``server.cwd``) with an empty TMPDIR (``server.tmpdir``) so tests can check it writes nothing.
``tls_cert`` (session)
    ``TLSFiles(cert, key)``: a self-signed certificate for 127.0.0.1 and localhost that is its own CA, so
    ``ca_bundle=tls_cert.cert`` verifies it.

``ServerHandle`` has ``url``, ``process``, ``args``, ``log_path``, ``token``, ``ca_bundle``, ``audit_dir``,
``cwd``, ``tmpdir``; ``client(**kwargs)`` returns an ``InferenceClient`` with the right token and CA bundle,
``log()`` the server's stdout+stderr so far, ``audit_files()`` the sorted ``*.npy`` audit copies.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from medprivacy.server.local import LocalServer, launch_local_server, option_value

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_PATCH = [16, 16, 16]
TINY_LABELS = {"0": "Background", "1": "CSF", "2": "Gray matter", "3": "White matter"}
TINY_ARCH = {
    "name": "unet",
    "in_channels": 1,
    "out_channels": 4,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 0,
}
SERVER_START_TIMEOUT = 90.0


def build_tiny_models(directory: Path, names: tuple[str, ...] = ("mixup-seg", "plain-seg"), seed: int = 0) -> Path:
    """Save seeded, untrained server models through the real registry (sha256 and manifest included)."""
    import torch

    from medprivacy.nets.registry import ModelSpec, build_network, save_model

    for offset, name in enumerate(names):
        torch.manual_seed(seed + offset)
        spec = ModelSpec(
            name=name,
            file=f"{name}.safetensors",
            arch=dict(TINY_ARCH),
            role="server",
            patch_size=list(TINY_PATCH),
            labels=dict(TINY_LABELS),
        )
        save_model(build_network(spec.arch), spec, directory)
    return Path(directory)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@dataclass
class ServerHandle(LocalServer):
    """A ``LocalServer`` with what the tests gave it: token, CA bundle, audit folder, working and temporary folders."""

    token: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None
    audit_dir: Path | None = None
    cwd: Path | None = None
    tmpdir: Path | None = None
    _scratch: Any = field(default=None, repr=False)

    def client(self, **kwargs):
        from medprivacy.transport.client import InferenceClient

        kwargs.setdefault("token", self.token)
        kwargs.setdefault("ca_bundle", self.ca_bundle)
        kwargs.setdefault("retries", 0)
        return InferenceClient(self.url, **kwargs)

    def audit_files(self) -> list[Path]:
        return sorted(self.audit_dir.glob("*.npy")) if self.audit_dir else []

    def stop(self) -> None:
        super().stop()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT) -> ServerHandle:
        """Block until /v1/health answers; on failure stop the server and raise ServerError with its log."""
        return super().wait_ready(timeout, ca_bundle=self.ca_bundle)


def launch_server(
    args: list[str],
    env: dict[str, str] | None = None,
    *,
    models_dir: str | os.PathLike | None = None,
    token: str | None = None,
    ca_bundle: str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
) -> ServerHandle:
    """Start ``medprivacy serve <args> --port <free>`` and return at once; call ``wait_ready()`` before use.

    Launching several servers before waiting lets their (import-heavy) startups overlap.
    ``env`` adds to (not replaces) the environment; MEDPRIVACY_TOKEN is removed unless ``env`` sets it, so a
    developer's own token never changes what a test means.
    """
    scratch = tempfile.TemporaryDirectory(prefix="medprivacy-server-")
    scratch_dir = Path(scratch.name)
    args = [str(a) for a in args]
    if models_dir is not None:
        args += ["--models-dir", str(models_dir)]
    if token is not None:
        token_file = scratch_dir / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        args += ["--token-file", str(token_file)]
    audit = option_value(args, "--audit-dir")

    child_env = {k: v for k, v in os.environ.items() if k != "MEDPRIVACY_TOKEN"}
    # One thread per server: several servers and the test process share few cores.
    child_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": child_env.get("OMP_NUM_THREADS", "1")})
    child_env.update(env or {})
    server = launch_local_server(args, scratch_dir / "server.log", env=child_env, cwd=cwd)
    return ServerHandle(
        server.url,
        server.process,
        server.args,
        server.log_path,
        errors_with_log=True,
        token=token,
        ca_bundle=Path(ca_bundle) if ca_bundle is not None else None,
        audit_dir=Path(audit) if audit else None,
        cwd=Path(cwd) if cwd is not None else None,
        tmpdir=Path(env["TMPDIR"]) if env and "TMPDIR" in env else None,
        _scratch=scratch,
    )


def start_server(
    args: list[str], env: dict[str, str] | None = None, *, timeout: float = SERVER_START_TIMEOUT, **kwargs
) -> ServerHandle:
    """``launch_server(args, env, **kwargs).wait_ready(timeout)``: a server that answers /v1/health.

    Raises RuntimeError with the server log if it exits or does not answer within ``timeout`` seconds.
    """
    return launch_server(args, env, **kwargs).wait_ready(timeout)


@pytest.fixture
def server_factory():
    """``server_factory(args, **start_server keywords)`` starts a server that stops when the test ends."""
    started: list[ServerHandle] = []

    def factory(args: list[str], env: dict[str, str] | None = None, **kwargs) -> ServerHandle:
        handle = start_server(args, env, **kwargs)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        handle.stop()


@contextlib.contextmanager
def open_and_token_servers(open_kwargs: dict, token_kwargs: dict):
    """Launch an open server and one requiring a fresh random token, overlapping their slow startups; both stop
    on exit, also when the second fails to launch. Yields ``(open_server, token_server)`` once both answer."""
    open_server = launch_server(**open_kwargs)
    try:
        token_server = launch_server(**token_kwargs, token=secrets.token_urlsafe(24))
    except BaseException:
        open_server.stop()
        raise
    try:
        yield open_server.wait_ready(), token_server.wait_ready()
    finally:
        open_server.stop()
        token_server.stop()


@pytest.fixture(scope="session")
def _session_servers(tiny_models_dir, tmp_path_factory):
    # Both session servers start together so their startups overlap; asking for one starts both.
    audit_dir = tmp_path_factory.mktemp("audit")
    cwd = tmp_path_factory.mktemp("server-cwd")
    tmpdir = tmp_path_factory.mktemp("server-tmp")
    with open_and_token_servers(
        dict(args=["--enable-baseline", "--audit-dir", audit_dir], models_dir=tiny_models_dir),
        dict(args=[], env={"TMPDIR": str(tmpdir)}, models_dir=tiny_models_dir, cwd=cwd),
    ) as pair:
        yield pair


@pytest.fixture(scope="session")
def live_server(_session_servers) -> ServerHandle:
    return _session_servers[0]


@pytest.fixture(scope="session")
def live_server_with_token(_session_servers) -> ServerHandle:
    return _session_servers[1]


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory) -> TLSFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    # CA:TRUE plus key identifiers: the certificate doubles as its own CA, and strict X.509 checks
    # (Python 3.13 turns them on by default) accept it as a trust anchor.
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return TLSFiles(cert=cert_path, key=key_path)


# --- Mixup-Privacy fixtures on real data -------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
# MEDPRIVACY_MODELS_DIR lets a developer test other weights (e.g. a training checkpoint) with the same suite.
SHIPPED_MODELS = Path(os.environ.get("MEDPRIVACY_MODELS_DIR", REPO_ROOT / "Resources" / "Models"))


class SampleBrain:
    """A held-out synthetic subject (real MNI152 T1, warped) in an oblique scanner grid, with its true labels."""

    def __init__(self, folder: Path):
        import SimpleITK as sitk

        from medprivacy.data.synth import HELD_OUT_SEED_BASE, synthesize_subject, to_scanner_space

        seed = HELD_OUT_SEED_BASE + 777
        self.image, self.labels = to_scanner_space(synthesize_subject(seed), seed)
        self.image_path = folder / "sample_t1.nii.gz"
        self.labels_path = folder / "sample_labels.nii.gz"
        sitk.WriteImage(self.image, str(self.image_path))
        sitk.WriteImage(self.labels, str(self.labels_path))


@pytest.fixture(scope="session")
def sample_brain(tmp_path_factory) -> SampleBrain:
    return SampleBrain(tmp_path_factory.mktemp("sample-brain"))


@pytest.fixture(scope="session")
def shipped_models() -> Path:
    if not (SHIPPED_MODELS / "manifest.json").is_file():
        pytest.fail(f"no shipped models in {SHIPPED_MODELS}; run 'make train'")
    return SHIPPED_MODELS


@pytest.fixture(scope="session")
def small_key_dir(tmp_path_factory, shipped_models) -> Path:
    """A private reference bank made by the real keygen, small enough to build in seconds."""
    from medprivacy.mixup.bank import generate_bank

    key_dir = tmp_path_factory.mktemp("keys") / "mixup-key"
    generate_bank(key_dir, subjects=1, patches=96)
    return key_dir


@pytest.fixture(scope="session")
def shipped_server(shipped_models, tmp_path_factory):
    """The real shipped models behind a real server, with the baseline endpoint and an audit copy of uploads."""
    audit = tmp_path_factory.mktemp("shipped-audit")
    handle = start_server(["--enable-baseline", "--audit-dir", str(audit)], models_dir=shipped_models)
    yield handle
    handle.stop()


# --- MedLocker: seeded, untrained, tiny versions of the served architectures (32x32 inputs) ---------------------
# They test transport, endpoint and GUI-logic mechanics, not watermark strength.

LABELS = {"0": "no lesion", "1": "lesion"}
SIZE = [32, 32]
#: Small widths of the served architectures (build_network fills in the rest of each contract).
CLASSIFIERS = {
    "wm-cls-resnet18": {"name": "resnet18", "widen_factor": 0.125},
    "wm-cls-densenet121": {"name": "densenet121", "init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]},
    "wm-cls-efficientnet-b0": {"name": "efficientnet-b0"},
    "wm-cls-vit": {
        "name": "vit",
        "img_size": SIZE,
        "patch_size": 16,
        "hidden_size": 16,
        "mlp_dim": 32,
        "num_layers": 1,
        "num_heads": 2,
    },
}
SEGMENTER = {"name": "unet2d", "channels": [4, 8], "strides": [2], "num_res_units": 0}


def build_watermark_models(
    directory: Path, classifiers=tuple(CLASSIFIERS), segmenter: bool = True, seed: int = 0
) -> Path:
    """Seeded random classifiers (and a lesion segmenter) saved through the real registry."""
    import torch

    from medprivacy.nets.registry import ModelSpec, build_network, save_model

    entries = [(name, CLASSIFIERS[name], "classify") for name in classifiers]
    if segmenter:
        entries.append(("wm-lesion-seg", SEGMENTER, "segment-lesion"))
    for offset, (name, arch, task) in enumerate(entries):
        torch.manual_seed(seed + offset)
        spec = ModelSpec(
            name=name,
            file=f"{name}.safetensors",
            arch=dict(arch),
            role="server",
            patch_size=list(SIZE),
            labels=dict(LABELS),
            extra={"task": task},
        )
        save_model(build_network(spec.arch), spec, directory)
    return Path(directory)


@pytest.fixture(scope="session")
def tiny_watermark_models_dir(tmp_path_factory) -> Path:
    """The four tiny classifiers and the tiny lesion segmenter, built once per test session."""
    return build_watermark_models(tmp_path_factory.mktemp("tiny-wm-models"))


# --- ObfuscationPrivacy: a seeded, untrained, tiny VAE (32x32 frames) -------------------------------------------
# It tests the transform's mechanics (keys, determinism, files, server jobs), not how well frames are hidden.

OBF_SIZE = 32
OBF_VAE_ARCH = {
    "name": "varautoencoder",
    "spatial_dims": 2,
    "in_shape": [1, OBF_SIZE, OBF_SIZE],
    "out_channels": 1,
    "latent_size": 8,
    "channels": [4, 8, 8],
    "strides": [2, 2, 2],
}


def build_obfuscation_models(directory: Path, seed: int = 0) -> Path:
    """The client VAE ``obf-vae`` saved through the real registry, with the shipped mapping defaults."""
    import torch

    from medprivacy.nets.registry import ModelSpec, build_network, save_model

    torch.manual_seed(seed)
    spec = ModelSpec(
        name="obf-vae",
        file="obf_vae.safetensors",
        arch=dict(OBF_VAE_ARCH),
        role="client",
        patch_size=[OBF_SIZE, OBF_SIZE],
        labels={},
        extra={"task": "obfuscation-vae", "latent_scale": [1.0] * OBF_VAE_ARCH["latent_size"]},
    )
    save_model(build_network(spec.arch), spec, directory)
    return Path(directory)


@pytest.fixture(scope="session")
def tiny_obfuscation_models_dir(tmp_path_factory) -> Path:
    """The tiny server models (mixup) plus the tiny obfuscation VAE in one folder, built once per session."""
    directory = tmp_path_factory.mktemp("tiny-obf-models")
    build_tiny_models(directory)
    return build_obfuscation_models(directory)


@pytest.fixture
def scene():
    """A fresh MRML scene from slicer-core (the Slicer logic tests' scene), closed after the test."""
    import slicer_support

    core_scene = slicer_support.make_scene()
    yield core_scene.scene
    core_scene.close()
