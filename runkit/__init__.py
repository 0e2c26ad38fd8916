"""Run-folder conventions shared by pretrain, downstream and tune: layered config, user errors, tracking."""
