"""Hugging Face MoE models in and out (optional extra: ``pip install 'lightning-moe[hf]'``).

::

    from transformers import AutoModelForCausalLM
    from lightning_moe.hf import from_hf, to_hf

    model = from_hf(AutoModelForCausalLM.from_pretrained(...), estimator="densemixer")
    ...  # train: every MoELayer estimator, backend and callback applies
    to_hf(model).save_pretrained("out")  # an ordinary Hugging Face folder

or in Lightning, :class:`HFMoELanguageModel` (``lightning-moe fit --config
recipes/posttrain_<name>.yaml``, then ``lightning-moe export CHECKPOINT --output DIR``).

The conversion only reads module structure and never imports ``transformers`` itself, so
importing this package costs nothing; :func:`from_hf` checks that ``transformers`` is
installed and says which extra to install when it is not.
"""

from lightning_moe.hf.convert import HFMoEBlock, from_hf, to_hf
from lightning_moe.hf.export import export_checkpoint, export_pretrained
from lightning_moe.hf.module import HFMoELanguageModel

__all__ = ["HFMoEBlock", "HFMoELanguageModel", "export_checkpoint", "export_pretrained", "from_hf", "to_hf"]
