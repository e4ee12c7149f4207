"""UperNet semantic segmentation for CrossMAE encoders: the task (``seg.task``), its command line
(``seg.commands``), mmseg import / export and mIoU evaluation."""
