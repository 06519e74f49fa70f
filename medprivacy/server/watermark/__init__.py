"""Watermark endpoints (the MedLocker method): classify images, find lesions, and search a watermark next to the models.

Models. Manifest entries with role "server" and ``task`` "classify" (2D classifiers: float32 (N, 3, H, W) in
[0, 1] -> logits (N, C)) or "segment-lesion" (-> lesion logits (N, 2, H, W)) are served when present; their
``patch_size`` [H, W] is the input size, and every image is resized to it on the server (bilinear, antialiased
when shrinking). Operators add their own classifiers with ``--extra-classifier NAME=model.pt[:HxW]``: a
TorchScript file, which is a program the server runs, so load only files you trust.

Endpoints (same bearer token, size limit, API-version header and one-line JSON errors as the rest of the server):

``POST /v1/watermark/classify[?models=a,b]``
    Body: a wire tensor (N, 3, H, W) (or (N, 1, H, W) gray), uint8 or float16, values in [0, 1], any H and W.
    Answer (JSON): ``{"count": N, "models": {name: {"labels": {...}, "probabilities": [[p_0, ..., p_C-1], ...],
    "predicted": [class, ...]}}}``. Default: every classifier.
``POST /v1/watermark/lesions[?model=name]``
    Body: a wire tensor (N, 3 or 1, H, W) as above. Answer: a wire tensor (N, 1, H, W) with the lesion
    probability at the image's own size, uint8 codes or float16 (``X-MedPrivacy-Response-Dtype``).
``POST /v1/watermark/optimize``
    One request per image, JSON: ``{"image": <wire>, "logo": <wire>, "mask": <wire, optional>, "params": {...}}``
    where <wire> is a base64 string of a wire tensor. ``image``: (1, C, H, W) with C = 1 (gray) or 3 (RGB), the
    exact pixels: uint8 for 8-bit images, float32 k/65535 for 16-bit ones. ``logo``: (1, 4, h, w) uint8 RGBA
    (1-3 channels also accepted). ``mask``: (1, 1, H, W), nonzero = lesion. ``params`` (all optional):

    ======================  ==================================  =============================================
    key                     paper / default                     meaning
    ======================  ==================================  =============================================
    mode                    "keep-out"                          keep-out | keep-in | wap (see boxes.py)
    lesions                 mask if sent, else server for       where lesion boxes come from: mask | server |
                            keep-in/keep-out when it has a      none
                            segmenter, else none
    mask_threshold          0.5                                 lesion probability counted as lesion
    mask_params             paper's, scaled to the image        {kernel, iterations, min_area, gamma}
    models, weights         every classifier*, equal            source models and beta_i of eq. 8
    sl                      sl = 4                              logo scale (eq. 2)
    population              Np = 50
    generations             Ng = 3
    crossover_rate          CR = 0.9
    step                    s = 10 (pixels)
    local_iterations        Niter = 3
    alpha_range             [100, 255]
    alpha_step              step scaled to the alpha range
    mutation                "basin-hopping"                     basin-hopping | random
    seed                    none (fresh randomness)
    label                   none: each model's own clean        the true class, moved away from by every
                            prediction                          model
    max_evaluations         none (server cap MAX_EVALUATIONS)
    window                  [0, 255] or [0, 65535]              intensity window [low, high] in pixel values:
                                                                the logo's black/white and the classifiers' 0/1
    ======================  ==================================  =============================================

    Every parameter has a type and bounds (``schema.OptimizeParams``); anything else is refused with a 422.

    * by default the largest group of classifiers with the same number of classes (a user's 3-class model is not
      mixed into the 2-class ensemble).

    Answer (JSON): ``params`` {alpha, x, y, sl}, ``logo_size`` [h, w], ``objective``, ``fooled``,
    ``evaluations``, ``stop_reason``, ``target`` (the label, or null), ``targets`` {model: class it was pushed away
    from}, ``target_source`` ("label" | "clean-prediction": each model's own answer on the clean image), ``models``,
    ``weights``, ``before`` / ``after`` {model: {probabilities, predicted}} on the clean and the watermarked image,
    ``history`` [{generation, evaluations, best_objective, population_mean, fooled}], ``mode``, ``lesion_source``,
    ``lesion_boxes`` [[x, y, w, h], ...] (the boxes that constrained the positions; none for wap), ``elapsed_s``.

Layout: ``models`` (what the server holds), ``scoring`` (rendering and classifying candidates), ``service`` (the
three requests, the search next to the models), ``routes`` (the HTTP endpoints). The search stops at its next batch
when the client disconnects.
"""

from __future__ import annotations

from .models import DEFAULT_SIZE, TASK_CLASSIFY, TASK_SEGMENT, ExtraClassifier, WatermarkModels, parse_extra_classifier
from .routes import add_watermark_routes
from .service import MAX_EVALUATIONS, MAX_IMAGE_SIDE, WatermarkService

__all__ = [
    "DEFAULT_SIZE",
    "MAX_EVALUATIONS",
    "MAX_IMAGE_SIDE",
    "TASK_CLASSIFY",
    "TASK_SEGMENT",
    "ExtraClassifier",
    "WatermarkModels",
    "WatermarkService",
    "add_watermark_routes",
    "parse_extra_classifier",
]
