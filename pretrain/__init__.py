"""Self-supervised Models Genesis pretraining: batched transforms, U-Net+CBAM model, loss and DeepSpeed engine."""
