"""The privacy half of ``medprivacy obfuscate eval`` (:mod:`.evaluate`): on one domain's held-out private frames,
the baselines, the VAE's own output, and the attacks of threat models (a), (b) and the key-known bound
(:mod:`.attacks` describes them), each scored with SSIM, PSNR and vessel Dice. ``EvalConfig.attacks`` picks the
threat models that run; (b)'s fine-tuned network starts from the (a) network, so (b) brings (a) along.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import InputError


def privacy(config, domain, public, key, obfuscator, vae, vae_spec, params, models_dir, device, progress):
    import torch

    from .attacks import AttackSettings, build_attack_net, reconstruct, scores, train_attack, vessel_mask
    from .train import public_frames
    from .transform import vae_sample

    scale = vae_spec.extra["latent_scale"]
    latent = int(vae_spec.arch["latent_size"])
    private = public_frames(domain, "test", config.privacy_frames, config.size, config.data_seed)
    masks = [vessel_mask(frame) for frame in private]
    progress(f"privacy/{domain}: obfuscating {len(private)} private frames with the victim key")
    codes = obfuscator.obfuscate_prepared(private)
    result = {"frames": len(private), "baselines": {}, "reference": {}, "attacks": {}}
    result["baselines"]["mean-frame"] = scores(
        np.repeat(public.mean(axis=0)[None], len(private), axis=0), private, masks
    )
    result["baselines"]["obfuscated-frame"] = scores(codes.astype(np.float32) / 255.0, private, masks)
    decoded = vae_sample(vae, private, np.zeros((len(private), latent), np.float32), 0.0, scale, device)
    result["reference"]["vae-output"] = scores(decoded, private, masks)
    shown = {
        "original": private,
        "vae-output": decoded,
        "obfuscated": codes.astype(np.float32) / 255.0,
        "mean-frame": np.repeat(public.mean(axis=0)[None], len(private), axis=0),
    }

    def record(name: str, guess: np.ndarray, extra: dict | None = None) -> None:
        result["attacks"][name] = dict(scores(guess, private, masks), **(extra or {}))
        shown[name] = guess
        progress(f"privacy/{domain}: {name} {result['attacks'][name]}")

    settings = AttackSettings(steps=config.attack_steps, batch_size=config.attack_batch, seed=config.key_seed)
    arch = {
        "name": "obf-attack",
        "channels": list(config.attack_channels),
        "strides": [2] * (len(config.attack_channels) - 1),
        "num_res_units": 1,
    }
    rng = np.random.default_rng([config.key_seed, 31, len(domain)])

    # (a) the algorithm and public data, keys of its own (b-finetune starts from it).
    attack_a = None
    if "a" in config.attacks or "b" in config.attacks:
        attack_a = _threat_a_network(
            config, domain, public, params, vae, vae_spec.sha256, scale, arch, models_dir, device, progress
        )
        result["attack_a_network"] = attack_a.provenance
        if "a" in config.attacks:
            record("a", reconstruct(attack_a, codes, device))
    pool = None
    if "b" in config.attacks or "oracle" in config.attacks:
        pool = public_frames(domain, "train", config.public_frames[domain], config.size, config.data_seed, start=30_000)
    if "b" in config.attacks:
        _threat_b(
            config,
            domain,
            key,
            obfuscator,
            vae,
            params,
            scale,
            latent,
            codes,
            attack_a,
            pool,
            arch,
            settings,
            rng,
            record,
            device,
            progress,
        )

    # The limit: the victim's whole key known (table and secret), unlimited public pairs made with it.
    if "oracle" in config.attacks:
        progress(f"privacy/{domain}: training the key-known (oracle) network ({config.attack_steps} steps)")
        oracle_codes = obfuscator.obfuscate_prepared(pool)
        oracle = build_attack_net(dict(arch, input="onehot", code_values=sorted(set(int(v) for v in key.code_values))))
        train_attack(oracle, lambda step, size: _sample(rng, oracle_codes, pool, size), settings, device)
        record("oracle", reconstruct(oracle, codes, device))
    del torch
    return result, {name: images[: config.grid_frames] for name, images in shown.items()}


def _threat_b(
    config,
    domain,
    key,
    obfuscator,
    vae,
    params,
    scale,
    latent,
    codes,
    attack_a,
    pool,
    arch,
    settings,
    rng,
    record,
    device,
    progress,
) -> None:
    """Threat (b): N leaked pairs of the victim's key, on top of (a)."""
    from .attacks import build_attack_net, estimate_table, lut_attack, reconstruct, train_attack, window_attack
    from .train import public_frames
    from .transform import obfuscate_with, vae_sample

    count = max(max(config.leaked), config.leaked_for_networks)
    leaked_plain = public_frames(domain, "validation", count, config.size, config.data_seed)
    leaked_codes = obfuscator.obfuscate_prepared(leaked_plain)
    for n in config.leaked:
        guess, fit = lut_attack(leaked_plain[:n], leaked_codes[:n], codes)
        record(f"b-lut/N={n}", guess, {"leaked": n, **fit})
        guess, fit = window_attack(leaked_plain[:n], leaked_codes[:n], codes)
        record(f"b-window/N={n}", guess, {"leaked": n, **fit})
    n = config.leaked_for_networks
    finetuned = build_attack_net(attack_a.arch if hasattr(attack_a, "arch") else dict(arch, input="invariant"))
    finetuned.load_state_dict(attack_a.state_dict())
    train_attack(
        finetuned,
        lambda step, size: _sample(rng, leaked_codes[:n], leaked_plain[:n], size),
        replace(settings, steps=config.finetune_steps, learning_rate=5e-4),
        device,
    )
    record(f"b-finetune/N={n}", reconstruct(finetuned, codes, device), {"leaked": n})
    noise_free = vae_sample(vae, leaked_plain[:n], np.zeros((n, latent), np.float32), 0.0, scale, device)
    estimate, explained = estimate_table(noise_free, leaked_codes[:n], params.levels)
    true_table = key.table
    progress(
        f"privacy/{domain}: b-keyfit table estimate from {n} pairs: {float((estimate == true_table).mean()):.2f} of "
        "levels right"
    )
    guessed_codes = obfuscate_with(vae, pool, estimate, params, scale, rng, device)
    keyfit = build_attack_net(dict(arch, input="onehot", code_values=sorted(set(int(v) for v in key.code_values))))
    progress(f"privacy/{domain}: training the b-keyfit network ({config.attack_steps} steps)")
    train_attack(keyfit, lambda step, size: _sample(rng, guessed_codes, pool, size), settings, device)
    record(
        f"b-keyfit/N={n}",
        reconstruct(keyfit, codes, device),
        {
            "leaked": n,
            "levels_recovered": round(float((estimate == true_table).mean()), 4),
            "explained_on_leaked": round(explained, 4),
        },
    )


def _sample(rng, codes: np.ndarray, plain: np.ndarray, size: int):
    index = rng.integers(len(codes), size=size)
    return codes[index], plain[index]


def _threat_a_network(config, domain, public, params, vae, vae_sha256, scale, arch, models_dir, device, progress):
    """The shipped threat-(a) attacker, or (``retrain_attack_a``) one retrained for other mapping parameters."""
    import random as pyrandom

    from ..nets.registry import load_manifest, load_model
    from .attacks import AttackSettings, build_attack_net, train_attack
    from .key import random_mapping
    from .keygen import VAE_MODEL
    from .train import ATTACK_NAMES
    from .transform import obfuscate_with

    name = ATTACK_NAMES[domain][0]
    if not config.retrain_attack_a:
        if name not in load_manifest(models_dir).get("models", {}):
            raise InputError(
                f"no threat-(a) attacker {name} in the models folder; pass --retrain-attack-a STEPS to train one, "
                f"or write it with 'medprivacy obfuscate train-models --models attack-{domain}'"
            )
        net, spec = load_model(name, models_dir, device)
        # The shipped attacker learnt one mapping and one VAE; any other would make its figure meaningless.
        if (
            spec.extra.get("mapping") != {**params.to_json(), "frame_size": list(params.frame_size)}
            and spec.extra.get("mapping") != params.to_json()
        ):
            raise InputError(
                f"the shipped {name} was trained against mapping {spec.extra.get('mapping')}, not {params.to_json()}; "
                "pass --retrain-attack-a STEPS to train one for these parameters"
            )
        if spec.extra.get("trained_against", {}).get(VAE_MODEL) != vae_sha256:
            raise InputError(
                f"the shipped {name} was trained against another {VAE_MODEL} than the one in the models folder; "
                "pass --retrain-attack-a STEPS to train one for this VAE"
            )
        net.arch = spec.arch
        net.provenance = {
            "source": "models folder",
            "name": name,
            "sha256": spec.sha256,
            "channels": spec.arch["channels"],
            "command": spec.extra.get("command"),
        }
        return net
    progress(
        f"privacy/{domain}: retraining the threat-(a) network for these parameters ({config.retrain_attack_a} steps)"
    )
    net = build_attack_net(dict(arch, input="invariant"))
    net.arch = dict(arch, input="invariant")
    rng = np.random.default_rng([config.key_seed, 41, len(domain)])
    keys = pyrandom.Random(config.key_seed + 77)

    def batches(step, size):
        index = rng.integers(len(public), size=size)
        out = np.empty((size,) + public.shape[1:], dtype=np.uint8)
        for i, j in enumerate(index):
            assignment, values = random_mapping(params, keys)
            out[i] = obfuscate_with(
                vae, public[j : j + 1], values[assignment].astype(np.uint8), params, scale, rng, device
            )[0]
        return out, public[index]

    train_attack(
        net,
        batches,
        AttackSettings(steps=config.retrain_attack_a, batch_size=config.attack_batch, seed=config.key_seed),
        device,
    )
    net.provenance = {"source": "retrained", "steps": config.retrain_attack_a, "channels": list(config.attack_channels)}
    return net
