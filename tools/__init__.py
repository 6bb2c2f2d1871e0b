"""Operator tools beside the runtime: the privacy audit (``audit``), pretraining a small base (``pretrain``)
and the fleet's broker secrets (``fleet_secrets``)."""
