"""Operations: each builds a plan of steps that check live state first, so a rerun resumes."""
