"""Classification transfer of CrossMAE encoders: finetuning, the linear probe and frozen-feature
evaluation (kNN and the fast linear probe), ``cls.task``."""
