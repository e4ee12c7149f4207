"""Classification transfer (finetune, linear probe, kNN) of CrossMAE encoders. Not yet built."""
