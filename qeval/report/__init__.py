"""Render stored records into report files (Markdown, HTML, plots)."""
