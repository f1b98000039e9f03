"""File formats, both directions: checkpoints (the one safe reader of .ckpt files and DCP folders), Hugging Face
transformers directories and GGUF files for llama.cpp. Import from the modules themselves."""
