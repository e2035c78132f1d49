"""A Markdown report as one self-contained HTML file: the same text, its images embedded as data URIs."""
from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path

STYLE = """
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 60rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; color: #1d1d1f; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #d2d2d7; padding: 0.3rem 0.6rem; text-align: left; }
th { background: #f5f5f7; }
img { max-width: 100%; }
pre { background: #f5f5f7; padding: 0.8rem; overflow-x: auto; }
code { font-family: ui-monospace, Menlo, monospace; font-size: 0.9em; }
"""

_IMG = re.compile(r'(<img\b[^>]*\bsrc=")([^"]+)(")')


def render(markdown_text, images, title):
    """The HTML page of `markdown_text`, each image whose src is a key of `images` ({src: file}) embedded.

    An image that is not in `images` or whose file is missing keeps its src (the page says so in its alt text
    rather than failing: a report is still worth having without one plot).
    """
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"], output_format="html")

    def embed(match):
        src = html.unescape(match.group(2))
        path = images.get(src)
        if path is None or not Path(path).is_file():
            return match.group(0)
        kind = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        return f"{match.group(1)}data:{kind};base64,{data}{match.group(3)}"

    body = _IMG.sub(embed, body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
