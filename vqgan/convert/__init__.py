"""Import released tokenizers (taming, IBQ, LlamaGen, diffusers) as vqgan tokenizer folders, and export ours."""
