"""Statistics over stored records: the paired comparison and the comparison frames."""
