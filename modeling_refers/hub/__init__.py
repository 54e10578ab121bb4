"""Sharing a model on the Hub: the model card (`model_card`, rendered from `model_card_template.md`) and the upload
with its allow-list of model files (`upload`)."""
