"""Downstream jobs on a (pretrained) encoder: 3-class diagnosis, frozen-backbone severity regression,
the NIH-14 pathology head, Score-CAM explanations, the seeds' protocols, and Ray Tune sweeps.

Modules:
- `config`: one dataclass per job (flags, YAML keys and search-space keys derive from them);
- `device`: the device spec, bf16 autocast on CUDA, uint8-then-convert;
- `backbones` (encoders of every origin), `data` (labels, the JSON-only shard index, in-memory sets,
  patient-grouped splits), `streaming` (large sets streamed a split at a time), `augment`;
- `finetune` (the shared classifier training loop), `diagnosis`, `nih14`, `severity` (features, the
  regressor factory, the patient-grouped ridge CV), `scorecam`, `compare`, `protocols` (seeds 000/004);
- `metrics`, `plots`;
- sweeps: `trials` (inside a trial), `sweep` (the driver), `tune_results` (reporting), `tune_space`
  (the space schema); `tuning` re-exports them for older callers.
"""
