"""What a pretrained REFERS model is used for, one module a task: zero-shot classification (`zero_shot`), image-report
retrieval (`retrieval`), report generation (`generation`), explanations (`explanations`: class activation maps, boxes,
IoU), segmentation (`segmentation`: UperNet on the backbone); `common` holds what they share (loading a run's folder,
batching, figures). A new task is a new module here plus a thin script in examples/."""
