"""Metrics, figures and reports of trained models: classification, kNN / linear probe, COCO AP, attention."""
