"""Downstream jobs on a (pretrained) encoder: 3-class diagnosis, frozen-backbone severity regression,
the NIH-14 pathology head, Score-CAM explanations, and the metrics and plots they report.

Modules: `backbones` (encoders of every origin), `data` (shards -> in-memory tensors), `augment`,
`finetune` (the shared classifier training loop), `diagnosis`, `severity`, `nih14`, `scorecam`,
`metrics`, `plots`, `compare` (initialisations over seeds).
"""
