"""The HTML report: one self-contained page (plotly.js inlined) from recorded runs.

``gradsight.report(logdir)`` reads run directories written by
:class:`gradsight.Monitor` and needs plotly (``pip install 'gradsight[report]'``),
imported only when a report is written.
"""

from gradsight.report._html import write_diagnosis_html
from gradsight.report._report import report

__all__ = ["report", "write_diagnosis_html"]
