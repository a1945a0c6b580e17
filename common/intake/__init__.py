"""Site data intake: manifests and DICOM folders, image readers, QC, preprocessing cache.

Everything here runs at the site and reads the site's data read-only. Nothing in this
package produces values that are sent to the server: paths, patient ids and DICOM tag
values stay in the site's own logs and QC report.
"""
