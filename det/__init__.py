"""ViTDet Mask R-CNN detection transfer of CrossMAE encoders. Not yet built."""
