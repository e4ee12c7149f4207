"""ViTDet Mask R-CNN on COCO-format data for CrossMAE encoders: the task (``det.task``), its
command line (``det.commands``), detectron2 import / export and COCO evaluation."""
