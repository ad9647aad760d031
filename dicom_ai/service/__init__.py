"""The PACS-facing service (``dicom-ai serve``): receive, assemble, process, export.

:mod:`~dicom_ai.service.scp` receives and acknowledges only what :mod:`~dicom_ai.service.spool`
has made durable; :mod:`~dicom_ai.service.studies` decides when a study is complete;
:mod:`~dicom_ai.service.worker` runs the pipeline in its own process;
:mod:`~dicom_ai.service.export` delivers results; :mod:`~dicom_ai.service.server` ties them
together and resumes unfinished work on start; :mod:`~dicom_ai.service.status` reports.
"""
