"""Clinical reference data for the simulator: observation codes, normal ranges, deterioration physiology.

These are descriptions of physiology, not thresholds the lakehouse acts on (NEWS2 bands live in conf).
Every vital sign and lab is one `Measure`; its index in MEASURES is the `code_no` the Spark expressions use.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measure:
    key: str
    loinc: str
    display: str
    unit: str              # UCUM
    base_low: float        # per-patient baseline drawn uniformly from [base_low, base_high]
    base_high: float
    noise_sd: float        # reading-to-reading variation
    circadian_amp: float   # amplitude of the 24 h cosine
    circadian_peak_h: float  # hour of day the cosine peaks
    decimals: int
    low: float             # physiological floor and ceiling the value is clipped to
    high: float


MEASURES: tuple[Measure, ...] = (
    Measure("hr", "8867-4", "Heart rate", "/min", 62, 94, 2.0, 4.0, 16, 0, 25, 220),
    Measure("rr", "9279-1", "Respiratory rate", "/min", 12, 18, 0.8, 1.0, 16, 0, 4, 60),
    Measure("spo2", "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%",
            95.5, 98.5, 0.5, 0.3, 14, 0, 60, 100),
    Measure("sbp", "8480-6", "Systolic blood pressure", "mm[Hg]", 106, 134, 4.0, 6.0, 15, 0, 50, 230),
    Measure("dbp", "8462-4", "Diastolic blood pressure", "mm[Hg]", 64, 84, 3.0, 4.0, 15, 0, 25, 140),
    Measure("temp", "8310-5", "Body temperature", "Cel", 36.5, 37.0, 0.08, 0.25, 18, 1, 33, 42.5),
    Measure("fio2", "3150-0", "Inhaled oxygen concentration", "%", 21, 21, 0.0, 0.0, 0, 0, 21, 100),
    Measure("o2flow", "3151-8", "Inhaled oxygen flow rate", "L/min", 0, 0, 0.0, 0.0, 0, 0, 0, 15),
    Measure("acvpu", "67775-7", "Level of responsiveness", "{score}", 0, 0, 0.08, 0.0, 0, 2, 0, 4),
    Measure("lactate", "2524-7", "Lactate [Moles/volume] in Serum or Plasma", "mmol/L",
            0.6, 1.5, 0.1, 0.0, 0, 1, 0.3, 20),
    Measure("wbc", "6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*9/L",
            4.8, 9.5, 0.3, 0.0, 0, 1, 0.5, 60),
    Measure("creatinine", "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL",
            0.6, 1.1, 0.03, 0.0, 0, 2, 0.2, 15),
    Measure("weight", "29463-7", "Body weight", "kg", 52, 104, 0.0, 0.0, 0, 1, 30, 250),
)
CODE_NO = {m.key: i for i, m in enumerate(MEASURES)}
BY_KEY = {m.key: m for m in MEASURES}

# What a bedside monitor reports every tick, and what a nurse records on a ward observation round.
MONITOR_KEYS = ("hr", "rr", "spo2", "sbp", "dbp", "temp", "fio2")
WARD_KEYS = ("hr", "rr", "spo2", "sbp", "dbp", "temp", "fio2", "o2flow", "acvpu")
LAB_KEYS = ("lactate", "wbc", "creatinine")
BP_PANEL = ("85354-9", "Blood pressure panel with all children optional")
VITALS_PANEL = ("85353-1", "Vital signs, weight, height, head circumference, oxygen saturation and BMI panel")
O2_DEVICE = ("41925-9", "Supplemental oxygen device")

# Level of consciousness: the ACVPU score (0 = Alert ... 4 = Unresponsive) rounds to a letter.
ACVPU = (("A", "Alert"), ("C", "New confusion"), ("V", "Responds to voice"), ("P", "Responds to pain"),
         ("U", "Unresponsive"))


def acvpu_letter(score: float) -> str:
    """The ACVPU letter for a consciousness score (0-4)."""
    return ACVPU[max(0, min(4, int(score + 0.5)))][0]


def oxygen_device(flow_l_min: float) -> str:
    """What a nurse would chart as the oxygen delivery for a flow."""
    if flow_l_min <= 0:
        return "Room air"
    return "Nasal cannula" if flow_l_min <= 5 else "Simple face mask" if flow_l_min <= 10 else "Non-rebreather mask"


@dataclass(frozen=True)
class Course:
    """How one kind of deterioration moves each measure: at full severity the value shifts by `delta`;
    a measure starts moving `stage` of the way through the onset-to-peak ramp (later signs have later stages)."""

    kind: str
    ramp_hours: float
    shifts: dict[str, tuple[float, float]]  # measure key -> (delta, stage)
    icd10: str
    icd10_display: str


COURSES: tuple[Course, ...] = (
    # Sepsis: fever, tachycardia and tachypnoea first; hypotension, confusion and rising lactate follow.
    Course("sepsis", 8.0, {
        "hr": (35, 0.0), "rr": (9, 0.0), "temp": (1.7, 0.0), "wbc": (11, 0.0), "lactate": (3.8, 0.25),
        "spo2": (-4, 0.3), "sbp": (-42, 0.4), "dbp": (-24, 0.4), "creatinine": (1.1, 0.45),
        "fio2": (14, 0.5), "o2flow": (4, 0.5), "acvpu": (1.4, 0.55),
    }, "A41.9", "Sepsis, unspecified organism"),
    # Respiratory failure: tachypnoea and desaturation, oxygen started, then tachycardia and drowsiness.
    Course("respiratory_failure", 6.0, {
        "rr": (15, 0.0), "spo2": (-11, 0.05), "hr": (24, 0.1), "sbp": (6, 0.2), "dbp": (4, 0.2),
        "temp": (0.4, 0.2), "fio2": (39, 0.3), "o2flow": (10, 0.3), "wbc": (3, 0.3), "lactate": (1.6, 0.5),
        "acvpu": (1.2, 0.65),
    }, "J96.01", "Acute respiratory failure with hypoxia"),
    # Haemorrhage: tachycardia, then falling blood pressure; lactate climbs as perfusion fails.
    Course("haemorrhage", 4.0, {
        "hr": (42, 0.0), "rr": (8, 0.1), "sbp": (-46, 0.2), "dbp": (-26, 0.2), "lactate": (4.2, 0.3),
        "wbc": (2, 0.3), "temp": (-0.5, 0.3), "spo2": (-3, 0.4), "fio2": (9, 0.5), "o2flow": (3, 0.5),
        "creatinine": (0.5, 0.5), "acvpu": (1.3, 0.6),
    }, "K92.2", "Gastrointestinal haemorrhage, unspecified"),
)
KIND_NO = {c.kind: i + 1 for i, c in enumerate(COURSES)}  # 0 = stable
COURSE = {c.kind: c for c in COURSES}

# Admission diagnoses for everyone else (ICD-10-CM).
DIAGNOSES = (
    ("J18.9", "Pneumonia, unspecified organism"), ("I50.9", "Heart failure, unspecified"),
    ("J44.1", "Chronic obstructive pulmonary disease with acute exacerbation"), ("L03.90", "Cellulitis, unspecified"),
    ("N39.0", "Urinary tract infection, site not specified"), ("I48.91", "Unspecified atrial fibrillation"),
    ("K85.90", "Acute pancreatitis without necrosis or infection, unspecified"),
    ("S72.001A", "Fracture of unspecified part of neck of right femur, initial encounter"),
    ("E11.65", "Type 2 diabetes mellitus with hyperglycemia"), ("I63.9", "Cerebral infarction, unspecified"),
)


def unit_variant(key: str, value: float) -> tuple[float, str] | None:
    """The same quantity in a unit senders also use (value converted), or None when the measure has none."""
    if key == "temp":
        return round(value * 9 / 5 + 32, 1), "[degF]"
    if key == "weight":
        return round(value * 2.20462, 1), "[lb_av]"
    if key == "fio2":
        return round(value / 100, 2), "1"
    if key == "creatinine":
        return round(value * 88.42, 0), "umol/L"
    return None


@dataclass(frozen=True)
class ImagingProcedure:
    cpt: str
    display: str
    modality: str       # DICOM modality
    sop_class: str      # DICOM storage SOP class UID
    body_part: str


IMAGING = {
    "cxr": ImagingProcedure("71046", "XR chest 2 views", "CR", "1.2.840.10008.5.1.4.1.1.1", "CHEST"),
    "ct_chest": ImagingProcedure("71250", "CT chest without contrast", "CT", "1.2.840.10008.5.1.4.1.1.2", "CHEST"),
    "ct_abdomen": ImagingProcedure("74176", "CT abdomen and pelvis without contrast", "CT",
                                   "1.2.840.10008.5.1.4.1.1.2", "ABDOMEN"),
    "ct_head": ImagingProcedure("70450", "CT head without contrast", "CT", "1.2.840.10008.5.1.4.1.1.2", "HEAD"),
    "cta_chest": ImagingProcedure("71275", "CT angiography chest (pulmonary embolism protocol)", "CT",
                                  "1.2.840.10008.5.1.4.1.1.2", "CHEST"),
    "us_abdomen": ImagingProcedure("76705", "US abdomen limited", "US", "1.2.840.10008.5.1.4.1.1.6.1", "ABDOMEN"),
    "mr_brain": ImagingProcedure("70551", "MRI brain without contrast", "MR", "1.2.840.10008.5.1.4.1.1.4", "HEAD"),
}


@dataclass(frozen=True)
class Indication:
    """Why a study is ordered: an ICD-10-CM code and text, the procedure, how likely it holds a critical finding
    (the ground truth's prevalence; sources in docs/imaging.md) and what that finding is."""

    code: str
    text: str
    procedure: str      # key of IMAGING
    critical_p: float
    finding: str


# Prevalences are plausible approximations of published yields (docs/imaging.md cites them): CT head for stroke
# symptoms ~12% (intracranial haemorrhage is ~10-15% of acute strokes), CT pulmonary angiography for suspected PE
# ~10% in emergency departments, CT head after minor head injury ~8%, CT angiography for GI bleeding ~25% active
# extravasation, routine chest films well under 1%.
INDICATIONS = {
    "stroke": Indication("R29.818", "Acute focal neurological deficit, stroke symptoms", "ct_head", 0.12,
                         "Acute intracranial haemorrhage"),
    "pe": Indication("R07.81", "Pleuritic chest pain, suspected pulmonary embolism", "cta_chest", 0.10,
                     "Acute pulmonary embolism"),
    "head_trauma": Indication("S09.90XA", "Head injury after a fall", "ct_head", 0.08, "Acute subdural haematoma"),
    "gi_bleed": Indication("K92.2", "Gastrointestinal bleeding", "ct_abdomen", 0.25, "Active contrast extravasation"),
    "abdominal_pain": Indication("R10.9", "Acute abdominal pain", "ct_abdomen", 0.06,
                                 "Free intraperitoneal air (perforation)"),
    "sepsis_source": Indication("A41.9", "Sepsis, source unknown", "ct_abdomen", 0.15, "Intra-abdominal abscess"),
    "dyspnoea": Indication("R06.00", "Shortness of breath", "cxr", 0.04, "Large pneumothorax"),
    "sepsis_film": Indication("A41.9", "Sepsis, chest source?", "cxr", 0.05, "Large pneumothorax"),
    "resp_failure": Indication("J96.01", "Acute respiratory failure with hypoxia", "cta_chest", 0.20,
                               "Acute pulmonary embolism"),
    "haemorrhage": Indication("K92.2", "Suspected internal bleeding, falling blood pressure", "ct_abdomen", 0.35,
                              "Active contrast extravasation"),
    "admission_film": Indication("Z01.818", "Routine admission chest film", "cxr", 0.01, "Large pneumothorax"),
    "confusion": Indication("R41.0", "New confusion", "ct_head", 0.05, "Acute intracranial haemorrhage"),
    "ruq_pain": Indication("R10.11", "Right upper quadrant pain", "us_abdomen", 0.01,
                           "Ruptured abdominal aortic aneurysm"),
    "headache": Indication("R51.9", "Chronic headache", "mr_brain", 0.01, "Mass with midline shift"),
    "icu_film": Indication("Z99.11", "Daily ICU chest film: tube and line position", "cxr", 0.03,
                           "Malpositioned endotracheal tube"),
    "preop": Indication("Z01.818", "Pre-operative chest film", "cxr", 0.005, "Large pneumothorax"),
}
# Where each kind of imaging comes from: (indication, weight, {priority: weight}). Ordering clinicians overuse STAT
# (half to two thirds of ED and inpatient CT orders in published audits) and under-triage some real emergencies
# (a wake-up stroke, a PE or bleed ordered ASAP or ROUTINE): docs/imaging.md cites the sources.
ED_CASES = (("stroke", 0.18, {"stat": 0.8, "asap": 0.15, "routine": 0.05}),
            ("pe", 0.16, {"stat": 0.5, "asap": 0.35, "routine": 0.15}),
            ("head_trauma", 0.16, {"stat": 0.55, "asap": 0.3, "routine": 0.15}),
            ("gi_bleed", 0.06, {"stat": 0.45, "asap": 0.4, "routine": 0.15}),
            ("abdominal_pain", 0.2, {"stat": 0.25, "asap": 0.5, "routine": 0.25}),
            ("dyspnoea", 0.24, {"stat": 0.3, "asap": 0.4, "routine": 0.3}))
OUTPATIENT_CASES = (("ruq_pain", 0.35, {"routine": 1.0}), ("headache", 0.25, {"routine": 1.0}),
                    ("preop", 0.4, {"routine": 1.0}))
# The study each deterioration prompts, and how urgently the ward team orders it (not always STAT: the team may not
# yet see how ill the patient is).
DETERIORATION_IMAGING = {"sepsis": "sepsis_film", "respiratory_failure": "resp_failure",
                         "haemorrhage": "haemorrhage"}
DETERIORATION_PRIORITY = {"stat": 0.6, "asap": 0.3, "routine": 0.1}
# An inpatient's acuity when the study is ordered (the NEWS2 band of the last charted observation set, or of the ICU
# monitor's last hourly set) multiplies the odds of a critical finding: sicker patients' studies find more (an
# assumption of the simulator, docs/imaging.md). No charted set (ED, outpatients): the indication's prevalence as it is.
ACUITY_ODDS = {"low": 0.7, "low-medium": 1.2, "medium": 2.0, "high": 3.5}


def critical_chance(prevalence: float, news2_band: str | None) -> float:
    """The probability of a critical finding: the indication's prevalence, its odds scaled by the patient's acuity."""
    if news2_band is None:
        return prevalence
    odds = prevalence / (1 - prevalence) * ACUITY_ODDS[news2_band]
    return odds / (1 + odds)


# Radiologists reading the studies: (id, family, given).
RADIOLOGISTS = (("RAD01", "Okafor", "Ada"), ("RAD02", "Lindqvist", "Per"), ("RAD03", "Haddad", "Leila"),
                ("RAD04", "Moreau", "Julien"), ("RAD05", "Tanaka", "Yumi"))
# Orders cancelled before the study is done (ORC-1 CA and ServiceRequest revoked; e.g. the patient left or the
# question was answered otherwise).
ORDER_CANCEL_FRACTION = 0.03
# Hours from the study to its read, by priority (uniform in the range).
READ_DELAY_H = {"stat": (0.15, 0.75), "asap": (0.5, 3.0), "routine": (1.0, 16.0)}
PRIORITY_DELAY_H = {"stat": (0.2, 0.75), "asap": (0.5, 2.0), "routine": (1.0, 6.0)}
HL7_PRIORITY = {"stat": "S", "asap": "A", "routine": "R"}


# -- heterogeneity: who the patient is, what passes, what the sensor gets wrong ------------------------------------
# Sources: RCP NEWS2 (2017) ch. 3 (SpO2 scale 2, 88-92 % targets in hypercapnic COPD); BTS oxygen guideline (O'Driscoll
# 2017); beta-blockers blunt the tachycardic response to sepsis/haemorrhage (Macchia 2012, Crit Care Med 40:2768);
# resting SBP falls and fever response blunts with age (Norman 2000, Clin Infect Dis 31:148); pulse-oximeter probe-off
# and motion artefacts last seconds to minutes (Tobin 2002; Petterson 2007); alarm fatigue: most monitor alarms are
# not actionable (Drew 2014, PLoS One 9:e110274); deteriorations are preceded by hours of abnormal, often only slowly
# drifting, vital signs (Buist 2004; Churpek 2012 Crit Care Med 40:2102).
@dataclass(frozen=True)
class Phenotype:
    """A baseline trait: per-measure baseline ranges that replace the population's, and gains on deterioration shifts.

    `chance` is the share of admissions with it; `diagnoses` (ICD-10 codes) and `min_age` raise it to `chance_if`.
    """

    name: str
    chance: float
    bases: dict[str, tuple[float, float]]
    gains: dict[str, float]
    chance_if: float = 0.0
    diagnoses: tuple[str, ...] = ()
    min_age: int = 200


PHENOTYPES: tuple[Phenotype, ...] = (
    # Chronic hypercapnic COPD: lives at SpO2 88-92 %, breathes faster, some on 1-2 L/min long-term oxygen.
    Phenotype("chronic_hypoxia", 0.03, {"spo2": (88.0, 92.0), "rr": (17.0, 21.0)}, {"spo2": 0.8},
              chance_if=0.45, diagnoses=("J44.1",)),
    # Beta-blocked (heart failure, atrial fibrillation, hypertension): slow pulse, blunted tachycardia.
    Phenotype("beta_blocked", 0.12, {"hr": (50.0, 64.0)}, {"hr": 0.35}, chance_if=0.55,
              diagnoses=("I50.9", "I48.91")),
    # Anxious / in pain at rest: fast pulse and breathing without illness.
    Phenotype("anxious_tachycardic", 0.08, {"hr": (88.0, 104.0), "rr": (17.0, 21.0), "sbp": (122.0, 142.0)}, {}),
    # Elderly with a low resting pressure and a blunted fever.
    Phenotype("elderly_low_bp", 0.04, {"sbp": (94.0, 110.0), "dbp": (52.0, 64.0)}, {"temp": 0.5},
              chance_if=0.3, min_age=75),
)
PHENOTYPE = {p.name: p for p in PHENOTYPES}
LONG_TERM_O2 = 0.25  # share of chronic_hypoxia patients on 1-2 L/min nasal oxygen throughout

# Transient illnesses that are not a labelled deterioration: they resolve by themselves or with simple treatment,
# and several of them push NEWS2 to 5 or more for hours (Course.ramp_hours = onset-to-plateau; stage as for COURSES).
BENIGN_COURSES: tuple[Course, ...] = (
    # Fever without sepsis (drug, transfusion, atelectasis, thrombophlebitis): febrile, a little faster.
    Course("benign_fever", 1.5, {"temp": (1.6, 0.0), "hr": (16, 0.1), "rr": (3, 0.2), "wbc": (1.5, 0.3)},
           "R50.9", "Fever, unspecified"),
    # Pain or anxiety (mobilisation, dressing change, a bad night): tachycardia, tachypnoea, higher pressure.
    Course("pain_anxiety", 0.5, {"hr": (26, 0.0), "rr": (7, 0.0), "sbp": (16, 0.1), "dbp": (8, 0.1)},
           "R52", "Pain, unspecified"),
    # Postural / post-analgesia / dehydration hypotension that a fluid bolus fixes.
    Course("transient_hypotension", 1.0, {"sbp": (-30, 0.0), "dbp": (-14, 0.0), "hr": (14, 0.2)},
           "I95.9", "Hypotension, unspecified"),
    # Mucus plugging / positional desaturation: oxygen started, resolves with physiotherapy.
    Course("transient_desaturation", 1.0, {"spo2": (-5, 0.0), "rr": (5, 0.1), "hr": (10, 0.2), "fio2": (7, 0.3),
                                           "o2flow": (2, 0.3)}, "R09.02", "Hypoxemia"),
)
BENIGN_NO = {c.kind: i + 1 for i, c in enumerate(BENIGN_COURSES)}  # 0 = none
BENIGN_EPISODE_CHANCE = 0.45   # admissions with one transient episode inside the window
BENIGN_PLATEAU_H = (1.0, 8.0)  # how long it lasts at its height

# A deterioration's pace and depth vary by patient: the course's ramp_hours times `speed`, every shift times
# `severity`. Slow, shallow courses drift within normal ranges for hours and cross NEWS2 5 late or not at all.
DETERIORATION_SPEED = (0.8, 3.0)
DETERIORATION_SEVERITY = (0.45, 1.1)


@dataclass(frozen=True)
class Artefact:
    """A measurement artefact: in each 30-min block a reading of `key` is off by [delta_low, delta_high] for
    [min_s, max_s] seconds with probability `chance`, then reads true again (what a probe falling off, a patient
    walking, a miscounted breath or a cold thermometer do)."""

    key: str
    chance: float
    delta_low: float
    delta_high: float
    min_s: int
    max_s: int


ARTEFACT_BLOCK_S = 1800
ARTEFACTS: tuple[Artefact, ...] = (
    Artefact("spo2", 0.25, -22.0, -6.0, 30, 240),    # probe off / poor perfusion / motion
    Artefact("hr", 0.25, 25.0, 55.0, 30, 300),       # motion, shivering, just walked back from the toilet
    Artefact("rr", 0.15, 6.0, 11.0, 60, 600),        # talking, miscounted over 15 s
    Artefact("sbp", 0.08, -28.0, 30.0, 60, 300),     # cuff size / arm position / moving during the measurement
    Artefact("temp", 0.08, -1.6, -0.7, 120, 600),    # tympanic probe badly placed, just drank something cold
)
