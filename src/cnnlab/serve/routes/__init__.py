"""One router per topic: `predict` (predictions and inspection), `info` (health, model), `page` (the drawing page)."""
