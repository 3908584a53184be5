"""What an adapter is: architectures, gates, LoRA, the zoo format, diffusers export."""
