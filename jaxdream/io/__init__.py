"""Files: weight files (safetensors, the pickle policy), tokenizers, images with A1111 metadata."""
