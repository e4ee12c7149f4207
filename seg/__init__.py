"""UperNet semantic segmentation transfer of CrossMAE encoders. Not yet built."""
