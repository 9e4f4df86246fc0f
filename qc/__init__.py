"""Quality control: image metrics, curation table and HTML reports."""
