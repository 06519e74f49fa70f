# Everything runs inside .venv/ at the repository root, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# A pinned CPU build: an unpinned torch pulls several GB of CUDA wheels. Override on a GPU box if needed.
TORCH_SPEC ?= torch==2.13.0

.PHONY: env demo test lint-fix bench bench-watermark bench-obfuscation train eval eval-watermark eval-obfuscation tradeoff-obfuscation audit privacy-curve clean

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[server,dev]"
	touch $(STAMP)

demo: env
	$(BIN)/medprivacy demo --out out/demo

# Applies ruff's safe fixes and its formatting (what make test checks).
lint-fix: env
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Lint and format check first (seconds), then the tests.
test: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: env
	$(BIN)/python bench/mixup_bench.py

bench-watermark: env
	$(BIN)/python bench/watermark_bench.py

bench-obfuscation: env
	$(BIN)/python bench/obfuscation_bench.py

# Regenerates the shipped weights in Resources/Models: the Mixup-Privacy networks in four stages (about 45 min on
# one core, then about 65, 85 and 45 min on two: the second continues at a lower rate on keygen-like references,
# the third and fourth move to 48³ patches for more context; the fourth is the first half of a 2000-iteration
# schedule, where the shipped run was cut short, and ends by fitting the decision weights, about 13 min); the fifth
# (about 25 min) teaches them the uploads of the private levels (secret offsets, 48 orientations, filled background,
# secret deformation), the first quarter of a 2000-iteration schedule, then the decision weights are fitted again at
# the default level (32 copies, eight validation subjects, about 23 min on two cores) and the attacker's separator
# for the audit is trained (about 25 min on one core);
# then the MedLocker classifiers and lesion segmenter (about two hours on one core, 70 min of it EfficientNet-B0),
# then the ObfuscationPrivacy VAE (about 16 min on one core, 9 of them rendering the public frames) and the threat-(a)
# attackers for the default key parameters (evaluation only, role attack: never in the client; U-Nets of widths
# 16-128, 1500 steps, the budget of the README's figures; about 20 min on one shared core, 5 of them rendering the public frames).
train: env
	$(BIN)/medprivacy mixup train --preset cpu-small --seed 0 --threads 1 --iterations 2000 --calibration-subjects 0 \
		--out Resources/Models
	$(BIN)/medprivacy mixup train --preset cpu-small --seed 1 --threads 2 --iterations 5000 --learning-rate 3e-4 \
		--reference-oversampling 4 --calibration-subjects 0 --init-from Resources/Models --out Resources/Models
	$(BIN)/medprivacy mixup train --preset cpu-small --seed 2 --threads 2 --iterations 2000 --patch-size 48 \
		--learning-rate 3e-4 --reference-oversampling 4 --calibration-subjects 0 --init-from Resources/Models --out Resources/Models
	$(BIN)/medprivacy mixup train --preset cpu-small --seed 3 --threads 2 --iterations 2000 --stop-after 1000 --patch-size 48 \
		--learning-rate 3e-4 --reference-oversampling 4 --init-from Resources/Models --out Resources/Models
	$(BIN)/medprivacy mixup train --preset cpu-small --seed 4 --threads 2 --iterations 2000 --stop-after 500 --patch-size 48 \
		--learning-rate 3e-4 --reference-oversampling 4 --target-sampling private --fill-probability 0.75 --warp-rms 4.5 \
		--calibration-subjects 0 --init-from Resources/Models --out Resources/Models
	$(BIN)/medprivacy mixup calibrate --privacy standard --threads 2
	$(BIN)/medprivacy mixup train-attacker --iterations 1500 --threads 1
	$(BIN)/medprivacy watermark train --preset cpu-small --seed 0 --threads 1 --out Resources/Models
	$(BIN)/medprivacy obfuscate train-models --preset cpu-small --seed 0 --threads 1 --models vae --out Resources/Models
	$(BIN)/medprivacy obfuscate train-models --preset cpu-small --seed 0 --threads 1 --models attack-angio,attack-fundus \
		--attack-steps 1500 --attack-channels 16,32,64,128 --out Resources/Models

eval: env
	$(BIN)/python bench/mixup_eval.py

eval-watermark: env
	$(BIN)/python bench/watermark_eval.py

eval-obfuscation: env
	$(BIN)/python bench/obfuscation_eval.py --parallel

tradeoff-obfuscation: env
	$(BIN)/python bench/obfuscation_tradeoff.py

# What a curious server recovers from the default level's uploads of the demo brain (attacks on 48 sampled uploads,
# 16 per re-identification scan, among 10 subjects scanned twice; about an hour on two cores).
audit: env
	$(BIN)/medprivacy mixup audit --seeded-key --seed 0 --sample 48 --reid-sample 16 --pairing-queries 2 --out bench/results/mixup_audit.json --png bench/results/mixup_audit.png

privacy-curve: env
	$(BIN)/python bench/mixup_privacy_curve.py

clean:
	rm -rf $(VENV) out .pytest_cache
