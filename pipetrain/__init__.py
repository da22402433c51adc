"""pipetrain: pipeline-parallel training for PyTorch on torch.distributed.rpc."""
