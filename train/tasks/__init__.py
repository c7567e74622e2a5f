"""Tasks: what differs between families in training (data, loss, metrics, sampling).

  base.py                 the Task protocol the trainer calls
  language_model.py       next-token prediction on packed text (Llama, and the base of MoE)
  moe_language_model.py   next-token prediction plus MoE balance losses and routing metrics
"""
