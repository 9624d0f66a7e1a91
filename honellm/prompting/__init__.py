"""Prompting: the prompt program, example selectors, contextual calibration, and prompt search -> Artifact."""
