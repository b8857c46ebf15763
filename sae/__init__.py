"""Sparse autoencoders on vision-model activations: models, kernels, checkpoints and metrics.

See DESIGN.md, "SAE". Other stages use only the names exported here (models, checkpoint I/O with the
input `Normalization` it records, the sparse latents); the trainer (sae.train) builds on this API:

    sae = SparseAutoencoder(SAEConfig(d_in=768, kind="topk", expansion=16, k=32), device)
    sae.init_from_data(sample)                   # b_dec = geometric median of a sample
    out = sae(x)                                 # ForwardOutput: x_hat, acts, losses, loss
    (out.loss + aux_coeff * sae.auxk_loss(x, out.x_hat, dead_mask, k_aux)).backward()
    sae.remove_parallel_grad(); optimizer.step(); sae.set_decoder_norm_to_unit()
    save(sae, "runs/x/sae", normalization=loader.normalization, extra={"step": step})
    TokenEncoder(sae, norm, spec).block(x)       # a store's block of tokens through the SAE, as every stage does
"""

from actstore.loader import Normalization
from sae.acts import SparseActs, csr_rows, positive_entries
from sae.checkpoint import load, read_extra, save
from sae.config import KINDS, SAEConfig
from sae.export import export_saelens, export_saev
from sae.model import ForwardOutput, SparseAutoencoder, geometric_median
from sae.tokens import TokenEncoder

__all__ = ["KINDS", "ForwardOutput", "Normalization", "SAEConfig", "SparseActs", "SparseAutoencoder", "TokenEncoder",
           "csr_rows", "export_saelens", "export_saev", "geometric_median", "load", "positive_entries", "read_extra",
           "save"]
