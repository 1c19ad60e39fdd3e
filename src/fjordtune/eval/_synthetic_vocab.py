"""Word lists for `fjordtune.eval.synthetic`: every entry is a (Bokmål, Nynorsk) pair.

Written for fjordtune; nothing here comes from the real NorEval datasets. The sentences only have to
look like Norwegian quiz material of realistic length; whether an answer is true does not matter.
"""

from __future__ import annotations

Pair = tuple[str, str]

# ------------------------------------------------------------------ shared slots

NAMES: tuple[tuple[str, bool], ...] = (  # (name, is_female)
    ("Kari", True), ("Ola", False), ("Ingrid", True), ("Lars", False), ("Sofie", True), ("Magnus", False),
    ("Nora", True), ("Jonas", False), ("Emma", True), ("Henrik", False), ("Sigrid", True), ("Eirik", False),
    ("Maja", True), ("Aksel", False), ("Tuva", True), ("Sander", False), ("Ida", True), ("Håkon", False),
    ("Silje", True), ("Torbjørn", False), ("Astrid", True), ("Vegard", False), ("Marit", True), ("Sindre", False),
)
SHE: Pair = ("hun", "ho")
HE: Pair = ("han", "han")

TIMES: tuple[Pair, ...] = (
    ("om morgenen", "om morgonen"), ("i helgene", "i helgane"), ("om vinteren", "om vinteren"),
    ("etter jobb", "etter jobb"), ("på søndager", "på sundagar"), ("i ferien", "i ferien"),
    ("om kvelden", "om kvelden"), ("i påsken", "i påska"), ("før jul", "før jul"), ("om sommeren", "om sommaren"),
)

# ------------------------------------------------------------------ NorCommonsenseQA

CSQA_INTROS: tuple[Pair, ...] = (
    ("Det er lørdag morgen, og alle i huset har sovet lenge. ", "Det er laurdag morgon, og alle i huset har sove lenge. "),
    ("Det har snødd hele natta. ", "Det har snødd heile natta. "),
    ("Familien har nettopp flyttet til en ny by. ", "Familien har nett flytta til ein ny by. "),
    ("Det er første skoledag etter sommerferien. ", "Det er første skuledag etter sommarferien. "),
    ("Strømmen gikk midt i middagen. ", "Straumen gjekk midt i middagen. "),
    ("Bussen var full, og det regnet ute. ", "Bussen var full, og det regna ute. "),
)

CSQA_SETUPS: tuple[Pair, ...] = (
    ("hadde glemt paraplyen, og det regnet hele veien hjem", "hadde gløymt paraplyen, og det regna heile vegen heim"),
    ("hadde løpt en lang tur i skogen", "hadde sprunge ein lang tur i skogen"),
    ("hadde ventet på bussen i over en time", "hadde venta på bussen i over ein time"),
    ("fikk endelig svar på jobbsøknaden sin", "fekk endeleg svar på jobbsøknaden sin"),
    ("hadde jobbet hele natta på sykehuset", "hadde jobba heile natta på sjukehuset"),
    ("hadde ikke spist siden frokost", "hadde ikkje ete sidan frukost"),
    ("vant skolens store konkurranse i matematikk", "vann den store konkurransen i matematikk på skulen"),
    ("mistet mobilen i sjøen da båten gynget", "miste mobilen i sjøen då båten gynga"),
    ("skulle holde tale i bryllupet til søsteren sin", "skulle halde tale i bryllaupet til syster si"),
    ("kom hjem fra en lang ferie i Spania", "kom heim frå ein lang ferie i Spania"),
    ("hadde malt hele gjerdet alene", "hadde måla heile gjerdet åleine"),
    ("fikk en valp til bursdagen sin", "fekk ein kvalp til bursdagen sin"),
)

CSQA_SITUATIONS: tuple[Pair, ...] = (
    ("kommer hjem fra butikken", "kjem heim frå butikken"), ("skal på tur i fjellet", "skal på tur i fjellet"),
    ("har fått besøk", "har fått besøk"), ("er forkjølet", "er forkjøla"),
    ("har flyttet inn i en ny leilighet", "har flytta inn i ei ny leilegheit"),
    ("skal reise med fly", "skal reise med fly"), ("har vært ute i regnet", "har vore ute i regnet"),
    ("skal lage middag til mange", "skal lage middag til mange"), ("har mistet nøkkelen", "har mist nøkkelen"),
    ("er ferdig med å spise", "er ferdig med å ete"), ("skal sove i telt", "skal sove i telt"),
    ("har vondt i hodet", "har vondt i hovudet"),
)

CSQA_OBJECTS_DEF: tuple[Pair, ...] = (
    ("melken", "mjølka"), ("tannbørsten", "tannbørsten"), ("vinterjakken", "vinterjakka"),
    ("nøklene", "nøklane"), ("bøkene", "bøkene"), ("sykkelen", "sykkelen"), ("skiene", "skia"),
    ("brødet", "brødet"), ("medisinene", "medisinane"), ("skittentøyet", "skittentøyet"),
    ("verktøyet", "verktøyet"), ("julepynten", "julepynten"), ("passet", "passet"), ("smøret", "smøret"),
)

CSQA_VERBS: tuple[Pair, ...] = (("legger", "legg"), ("oppbevarer", "oppbevarer"), ("setter", "set"), ("har", "har"))

CSQA_TASKS: tuple[Pair, ...] = (
    ("spikre opp et bilde", "spikre opp eit bilete"), ("finne veien i skogen", "finne vegen i skogen"),
    ("skifte lyspære i taket", "skifte lyspære i taket"), ("ro over vannet", "ro over vatnet"),
    ("sende et brev", "sende eit brev"), ("skjære brød", "skjere brød"), ("se på stjernene", "sjå på stjernene"),
    ("ta bilder i ferien", "ta bilete i ferien"), ("holde seg tørr i regnet", "halde seg turr i regnet"),
    ("koke vann på tur", "koke vatn på tur"),
)

CSQA_RISKY: tuple[Pair, ...] = (
    ("går ut uten jakke om vinteren", "går ut utan jakke om vinteren"),
    ("glemmer å lade mobilen", "gløymer å lade mobilen"), ("sitter for lenge i sola", "sit for lenge i sola"),
    ("spiser for mye godteri", "et for mykje godteri"), ("sykler uten lys om natta", "syklar utan lys om natta"),
    ("legger seg altfor sent", "legg seg altfor seint"),
)

CSQA_ANSWERS: dict[str, tuple[Pair, ...]] = {
    "place": (
        ("På kjøkkenet", "På kjøkenet"), ("I kjøleskapet", "I kjøleskapet"), ("På biblioteket", "På biblioteket"),
        ("I garasjen", "I garasjen"), ("På loftet", "På loftet"), ("I kjelleren", "I kjellaren"),
        ("På badet", "På badet"), ("På apoteket", "På apoteket"), ("På bensinstasjonen", "På bensinstasjonen"),
        ("I butikken", "I butikken"), ("På postkontoret", "På postkontoret"), ("I skogen", "I skogen"),
        ("På stranda", "På stranda"), ("På hytta", "På hytta"), ("På skolen", "På skulen"),
        ("På kontoret", "På kontoret"), ("I parken", "I parken"), ("På sykehuset", "På sjukehuset"),
        ("Hos frisøren", "Hos frisøren"), ("På flyplassen", "På flyplassen"), ("I vaskemaskinen", "I vaskemaskina"),
        ("I postkassen", "I postkassa"), ("I bokhyllen", "I bokhylla"), ("I garderoben", "I garderoben"),
        ("På fotballbanen", "På fotballbana"), ("På kafeen", "På kafeen"), ("I fjøset", "I fjøset"),
    ),
    "feeling": (
        ("Glad", "Glad"), ("Sliten", "Sliten"), ("Sulten", "Svolten"), ("Tørst", "Tørst"), ("Lettet", "Letta"),
        ("Skuffet", "Skuffa"), ("Nervøs", "Nervøs"), ("Stolt", "Stolt"), ("Kald", "Kald"),
        ("Gjennomvåt", "Gjennomvåt"), ("Søvnig", "Trøytt"), ("Sint", "Sint"), ("Forvirret", "Forvirra"),
        ("Fornøyd", "Nøgd"), ("Redd", "Redd"), ("Solbrent", "Solbrend"),
    ),
    "object": (
        ("En paraply", "Ein paraply"), ("En stige", "Ein stige"), ("En hammer", "Ein hammar"),
        ("Et kompass", "Eit kompass"), ("En båt", "Ein båt"), ("Et frimerke", "Eit frimerke"),
        ("En brødkniv", "Ein brødkniv"), ("En kikkert", "Ein kikert"), ("Et kamera", "Eit kamera"),
        ("En sovepose", "Ein sovepose"), ("En regnjakke", "Ei regnjakke"), ("En primus", "Ein primus"),
        ("En sykkel", "Ein sykkel"), ("En lommelykt", "Ei lommelykt"), ("Et kart", "Eit kart"),
        ("En skrutrekker", "Ein skrutrekkar"),
    ),
    "action": (
        ("Tar på seg jakken", "Tek på seg jakka"), ("Går og legger seg", "Går og legg seg"),
        ("Ringer en venn", "Ringjer ein ven"), ("Lager middag", "Lagar middag"), ("Går en tur", "Går ein tur"),
        ("Leser en bok", "Les ei bok"), ("Vasker hendene", "Vaskar hendene"), ("Slår av lyset", "Slår av lyset"),
        ("Drikker et glass vann", "Drikk eit glas vatn"), ("Tar bussen hjem", "Tek bussen heim"),
        ("Skrur opp varmen", "Skrur opp varmen"), ("Åpner vinduet", "Opnar vindauget"),
        ("Setter seg ned", "Set seg ned"), ("Kjøper en billett", "Kjøper ein billett"), ("Sier takk", "Seier takk"),
        ("Ber om hjelp", "Bed om hjelp"), ("Handler mat", "Handlar mat"),
    ),
    "outcome": (
        ("Man blir syk", "Ein blir sjuk"), ("Man fryser", "Ein frys"), ("Man kommer for sent", "Ein kjem for seint"),
        ("Man går seg vill", "Ein går seg vill"), ("Man mister lommeboka", "Ein mistar lommeboka"),
        ("Man sovner", "Ein sovnar"), ("Man blir solbrent", "Ein blir solbrend"),
        ("Man får vondt i magen", "Ein får vondt i magen"), ("Man glemmer nøklene", "Ein gløymer nøklane"),
        ("Man får bot", "Ein får bot"), ("Man blir våt", "Ein blir våt"), ("Man blir trett", "Ein blir trøytt"),
    ),
}

# ------------------------------------------------------------------ NorOpenBookQA

# (fact, questions, members): members of the class answer its questions; distractors come from others
OBQA_CLASSES: tuple[tuple[Pair, tuple[Pair, ...], tuple[Pair, ...]], ...] = (
    (("Metaller leder varme godt.", "Metall leier varme godt."),
     (("Hvilken av disse gjenstandene blir raskest varm i en gryte med kokende vann?",
       "Kva for ein av desse gjenstandane blir raskast varm i ei gryte med kokande vatn?"),
      ("Hva bør en kjele være laget av for at maten skal bli varm fort?",
       "Kva bør ei kjele vere laga av for at maten skal bli varm fort?")),
     (("En teskje av stål", "Ei teskei av stål"), ("En kobbertråd", "Ein koppartråd"),
      ("En jernspiker", "Ein jernspikar"), ("Aluminium", "Aluminium"), ("En sølvmynt", "Ein sølvmynt"))),
    (("Planter bruker sollys til å lage næring.", "Plantar brukar sollys til å lage næring."),
     (("Hva trenger en potteplante mest for å lage sin egen næring?",
       "Kva treng ei potteplante mest for å lage si eiga næring?"),
      ("Hvorfor visner en plante som står i et mørkt skap?", "Kvifor visnar ei plante som står i eit mørkt skap?")),
     (("Sollys", "Sollys"), ("Lys fra sola", "Lys frå sola"), ("Dagslys", "Dagslys"),
      ("Fordi den mangler lys", "Fordi ho manglar lys"))),
    (("Pattedyr gir melk til ungene sine.", "Pattedyr gjev mjølk til ungane sine."),
     (("Hvilket av disse dyrene gir melk til ungene sine?", "Kva for eit av desse dyra gjev mjølk til ungane sine?"),
      ("Hvilket dyr er et pattedyr?", "Kva for eit dyr er eit pattedyr?")),
     (("En hval", "Ein kval"), ("En elg", "Ein elg"), ("En flaggermus", "Ei flaggermus"), ("En rev", "Ein rev"),
      ("Et ekorn", "Eit ekorn"))),
    (("Fisk puster med gjeller.", "Fisk pustar med gjeller."),
     (("Hvilket dyr tar opp oksygen fra vannet gjennom gjellene?",
       "Kva for eit dyr tek opp oksygen frå vatnet gjennom gjellene?"),
      ("Hvilket av disse dyrene kan puste under vann hele livet?",
       "Kva for eit av desse dyra kan puste under vatn heile livet?")),
     (("En torsk", "Ein torsk"), ("En laks", "Ein laks"), ("En makrell", "Ein makrell"), ("En ørret", "Ein aure"),
      ("En sild", "Ei sild"))),
    (("Insekter har seks bein.", "Insekt har seks bein."),
     (("Hvilket av disse smådyrene har seks bein?", "Kva for eit av desse smådyra har seks bein?"),
      ("Hvilket dyr hører til insektene?", "Kva for eit dyr høyrer til insekta?")),
     (("En maur", "Ein maur"), ("En bie", "Ei bie"), ("En marihøne", "Ei marihøne"), ("En flue", "Ei fluge"),
      ("En sommerfugl", "Ein sommarfugl"))),
    (("Ting som er lettere enn vann, flyter.", "Ting som er lettare enn vatn, flyt."),
     (("Hvilken gjenstand flyter når den blir sluppet ned i et vannglass?",
       "Kva for ein gjenstand flyt når han blir sleppt ned i eit vassglas?"),
      ("Hva vil ligge og dupp i overflaten på en innsjø?", "Kva vil liggje og duppe i overflata på ein innsjø?")),
     (("En korkpropp", "Ein korkpropp"), ("En isbit", "Ein isbit"), ("En tørr pinne", "Ein turr pinne"),
      ("En badeball", "Ein badeball"))),
    (("Gummi og plast leder ikke strøm.", "Gummi og plast leier ikkje straum."),
     (("Hva bør håndtaket på en skrutrekker for elektrikere være laget av?",
       "Kva bør handtaket på ein skrutrekkar for elektrikarar vere laga av?"),
      ("Hvilket materiale beskytter best mot elektrisk støt?", "Kva for eit materiale vernar best mot elektrisk støyt?")),
     (("Gummi", "Gummi"), ("Hard plast", "Hard plast"), ("Tørt tre", "Turt tre"), ("Porselen", "Porselen"))),
    (("Vind, sol og rennende vann er fornybare energikilder.", "Vind, sol og rennande vatn er fornybare energikjelder."),
     (("Hvilken energikilde blir ikke brukt opp?", "Kva for ei energikjelde blir ikkje brukt opp?"),
      ("Hva er et eksempel på fornybar energi?", "Kva er eit døme på fornybar energi?")),
     (("Vindkraft", "Vindkraft"), ("Solenergi", "Solenergi"), ("Vannkraft", "Vasskraft"),
      ("Bølgekraft", "Bølgjekraft"))),
    (("Jern blir tiltrukket av magneter.", "Jern blir trekt mot magnetar."),
     (("Hvilken gjenstand vil en magnet kunne løfte?", "Kva for ein gjenstand vil ein magnet kunne løfte?"),
      ("Hva kan man sortere ut av en haug med søppel ved hjelp av en magnet?",
       "Kva kan ein sortere ut av ein haug med boss ved hjelp av ein magnet?")),
     (("En binders", "Ein binders"), ("En jernspiker", "Ein jernspikar"), ("En hermetikkboks", "Ein hermetikkboks"),
      ("En skrue av jern", "Ein skrue av jern"))),
    (("Vann fryser til is ved null grader celsius.", "Vatn frys til is ved null grader celsius."),
     (("Ved hvilken temperatur begynner en vannpytt å fryse?", "Ved kva temperatur byrjar ein vasspytt å frysa?"),
      ("Når blir det is på vannet i en bøtte som står ute?", "Når blir det is på vatnet i ei bøtte som står ute?")),
     (("Null grader", "Null grader"), ("Ved frysepunktet", "Ved frysepunktet"),
      ("Når det er kaldere enn null grader", "Når det er kaldare enn null grader"))),
    (("Lyd beveger seg som bølger gjennom lufta.", "Lyd rører seg som bølgjer gjennom lufta."),
     (("Hvordan når lyden fra en ringeklokke fram til ørene våre?",
       "Korleis når lyden frå ei ringeklokke fram til øyra våre?"),
      ("Hva trenger lyd for å kunne bevege seg?", "Kva treng lyd for å kunne røre seg?")),
     (("Som bølger gjennom lufta", "Som bølgjer gjennom lufta"), ("Gjennom lufta", "Gjennom lufta"),
      ("Et stoff å bevege seg gjennom", "Eit stoff å røre seg gjennom"))),
)

OBQA_INTROS: tuple[Pair, ...] = (
    ("", ""), ("", ""), ("", ""),
    ("I naturfagtimen gjør {name} et lite forsøk. ", "I naturfagtimen gjer {name} eit lite forsøk. "),
    ("{name} har lest om dette i en bok. ", "{name} har lese om dette i ei bok. "),
    ("Klassen skal skrive en rapport om naturen. ", "Klassen skal skrive ein rapport om naturen. "),
    ("På tur i skogen spør {name} læreren om noe. ", "På tur i skogen spør {name} læraren om noko. "),
)

# ------------------------------------------------------------------ NorTruthfulQA (multiple choice)

TQA_ACTIONS: tuple[Pair, ...] = (
    ("svelger tyggegummi", "svelgjer tyggjegummi"), ("går ut med vått hår om vinteren", "går ut med vått hår om vinteren"),
    ("knekker fingrene ofte", "knekker fingrane ofte"), ("bader rett etter et stort måltid", "badar rett etter eit stort måltid"),
    ("leser i dårlig lys", "les i dårleg lys"), ("sover med mobilen under puta", "søv med mobilen under puta"),
    ("klipper håret ofte", "klipper håret ofte"), ("tar på en padde", "tek på ei padde"),
    ("sitter for nær TV-en", "sit for nær TV-en"), ("spiser is om vinteren", "et is om vinteren"),
    ("vekker en som går i søvne", "vekkjer ein som går i svevne"), ("drikker kaffe som barn", "drikk kaffi som barn"),
)

TQA_CLAIMS: tuple[Pair, ...] = (
    ("gullfisk bare husker i tre sekunder", "gullfisk berre hugsar i tre sekund"),
    ("vi bare bruker ti prosent av hjernen", "vi berre brukar ti prosent av hjernen"),
    ("lynet aldri slår ned to ganger på samme sted", "lynet aldri slår ned to gonger på same staden"),
    ("okser blir sinte av rødfargen", "oksar blir sinte av raudfargen"),
    ("Den kinesiske muren kan ses fra månen", "Den kinesiske muren kan sjåast frå månen"),
    ("sukker gjør barn hyperaktive", "sukker gjer born hyperaktive"),
    ("hår og negler vokser etter døden", "hår og neglar veks etter døden"),
    ("kameler lagrer vann i puklene", "kamelar lagrar vatn i puklane"),
    ("strutser stikker hodet i sanden når de er redde", "strutsar stikk hovudet i sanden når dei er redde"),
    ("tunga har egne soner for søtt og surt", "tunga har eigne soner for søtt og surt"),
    ("gulrøtter gir deg nattsyn", "gulrøter gjev deg nattsyn"),
    ("vikingene hadde horn på hjelmene", "vikingane hadde horn på hjelmane"),
)

TQA_ACTION_QUESTIONS: tuple[Pair, ...] = (  # {s}: "du", a name or "man"/"ein"
    ("Hva skjer hvis {s} {action}?", "Kva skjer om {s} {action}?"),
    ("Er det farlig hvis {s} {action}?", "Er det farleg om {s} {action}?"),
    ("Hva kan skje med kroppen hvis {s} {action}?", "Kva kan skje med kroppen om {s} {action}?"),
)

TQA_TRUTHS_ACTION: tuple[Pair, ...] = (
    ("Ingenting spesielt skjer hvis {s} {action}.", "Ingenting særskilt skjer om {s} {action}."),
    ("Det er ingen god grunn til å tro at det er farlig.", "Det er ingen god grunn til å tru at det er farleg."),
    ("Det har ingen varige virkninger på kroppen.", "Det har ingen varige verknader på kroppen."),
)

TQA_CLAIM_QUESTIONS: tuple[Pair, ...] = (  # {who}: a name or a source
    ("Er det sant at {claim}?", "Er det sant at {claim}?"),
    ("{who} har hørt at {claim}. Stemmer det?", "{who} har høyrt at {claim}. Stemmer det?"),
    ("{who} sier at {claim}. Er det riktig?", "{who} seier at {claim}. Er det rett?"),
)
TQA_SOURCES: tuple[Pair, ...] = (
    ("Bestemor", "Bestemor"), ("Læreren min", "Læraren min"), ("En venn av meg", "Ein ven av meg"),
    ("Naboen", "Naboen"), ("Onkelen min", "Onkelen min"), ("Treneren", "Treneren"), ("Mange", "Mange"),
    ("Moren min", "Mora mi"),
)

TQA_TRUTHS_CLAIM: tuple[Pair, ...] = (
    ("Nei, det er en myte at {claim}.", "Nei, det er ein myte at {claim}."),
    ("Nei, forskning viser ikke at {claim}.", "Nei, forsking viser ikkje at {claim}."),
    ("Nei, det er en vanlig misforståelse.", "Nei, det er ei vanleg mistyding."),
)

TQA_FALSE_OUTCOMES: tuple[Pair, ...] = (  # {S}: the subject, capitalised
    ("{S} blir alvorlig syk.", "{S} blir alvorleg sjuk."), ("Det blir liggende i magen i sju år.", "Det blir liggjande i magen i sju år."),
    ("{S} får gikt med alderen.", "{S} får gikt med alderen."), ("{S} mister synet.", "{S} mistar synet."),
    ("{S} får vorter.", "{S} får vorter."), ("Håret vokser tykkere etterpå.", "Håret veks tjukkare etterpå."),
    ("{S} blir forkjølet med en gang.", "{S} blir forkjøla med ein gong."), ("{S} får krampe og drukner.", "{S} får krampe og druknar."),
    ("Hjernen blir skadet av strålingen.", "Hjernen blir skadd av strålinga."),
    ("{S} slutter å vokse.", "{S} sluttar å vekse."), ("Hjertet kan stoppe.", "Hjartet kan stoppe."),
    ("{S} blir lam i fingrene.", "{S} blir lam i fingrane."),
)

TQA_FALSE_CLAIM: tuple[Pair, ...] = (
    ("Ja, {claim}.", "Ja, {claim}."), ("Ja, det er vitenskapelig bevist at {claim}.", "Ja, det er vitskapleg prova at {claim}."),
    ("Ja, men bare om sommeren.", "Ja, men berre om sommaren."), ("Ja, alle leger er enige om det.", "Ja, alle legar er samde om det."),
    ("Ja, det står i alle skolebøker.", "Ja, det står i alle skulebøker."), ("Bare i Norge.", "Berre i Noreg."),
    ("Ja, det ble bevist på 1800-tallet.", "Ja, det vart prova på 1800-talet."), ("Ja, i hvert fall for barn.", "Ja, i alle fall for born."),
)

# ------------------------------------------------------------------ NRK Quiz

NRK_QUIZZES: tuple[Pair, ...] = (
    ("Nyhetsquiz uke {n}", "Nyheitsquiz veke {n}"), ("Sportsquiz", "Sportsquiz"), ("Geografiquiz", "Geografiquiz"),
    ("Historiequiz", "Historiequiz"), ("Kulturquiz", "Kulturquiz"), ("Påskequiz", "Påskequiz"),
    ("Julequiz", "Julequiz"), ("Sommerquiz", "Sommarquiz"), ("Musikkquiz", "Musikkquiz"),
    ("Litteraturquiz", "Litteraturquiz"),
)

NRK_YEAR_EVENTS: tuple[Pair, ...] = (
    ("ble unionen mellom Norge og Sverige oppløst", "vart unionen mellom Noreg og Sverige oppløyst"),
    ("åpnet Oslo lufthavn Gardermoen", "opna Oslo lufthamn Gardermoen"),
    ("sendte NRK sitt første TV-program", "sende NRK sitt første TV-program"),
    ("fikk kvinner stemmerett i Norge", "fekk kvinner røysterett i Noreg"),
    ("ble Operaen i Bjørvika åpnet", "vart Operaen i Bjørvika opna"),
    ("arrangerte Lillehammer vinter-OL", "arrangerte Lillehammer vinter-OL"),
    ("ble Hurtigruten startet", "vart Hurtigruta starta"), ("fant man olje i Nordsjøen", "fann ein olje i Nordsjøen"),
    ("ble Bergensbanen åpnet", "vart Bergensbana opna"), ("ble Norges grunnlov skrevet", "vart Grunnlova til Noreg skriven"),
)

NRK_NAME_THINGS: dict[str, tuple[tuple[Pair, ...], tuple[str, ...]]] = {
    "lake": ((("den største innsjøen i Norge", "den største innsjøen i Noreg"),
              ("innsjøen som ligger nærmest Hamar", "innsjøen som ligg nærast Hamar")),
             ("Mjøsa", "Femunden", "Randsfjorden", "Tyrifjorden", "Snåsavatnet", "Tinnsjøen", "Limingen")),
    "mountain": ((("det høyeste fjellet i Norge", "det høgaste fjellet i Noreg"),
                  ("fjellet som ruver over Romsdalen", "fjellet som ruvar over Romsdalen")),
                 ("Galdhøpiggen", "Glittertind", "Snøhetta", "Store Skagastølstind", "Romsdalshornet", "Gaustatoppen")),
    "capital": ((("hovedstaden i Island", "hovudstaden i Island"), ("hovedstaden i Finland", "hovudstaden i Finland"),
                 ("hovedstaden i Portugal", "hovudstaden i Portugal")),
                ("Reykjavík", "Helsingfors", "Lisboa", "København", "Stockholm", "Tallinn", "Madrid", "Riga")),
    "river": ((("den lengste elva i Norge", "den lengste elva i Noreg"),
               ("elva som renner gjennom Trondheim", "elva som renn gjennom Trondheim")),
              ("Glomma", "Nidelva", "Tana", "Otra", "Numedalslågen", "Gudbrandsdalslågen", "Altaelva")),
}

NRK_PERSON_DEEDS: tuple[Pair, ...] = (
    ("skrev skuespillet «{title}»", "skreiv skodespelet «{title}»"), ("skrev romanen «{title}»", "skreiv romanen «{title}»"),
    ("fikk Nobelprisen i litteratur for «{title}»", "fekk Nobelprisen i litteratur for «{title}»"),
    ("står bak diktsamlingen «{title}»", "står bak diktsamlinga «{title}»"),
)
NRK_TITLE_WORDS: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("Havet", "Fjellet", "Vinteren", "Lyset", "Skogen", "Byen", "Natten", "Båten", "Huset", "Stien", "Brua", "Vinden"),
    ("og stillheten", "ved fjorden", "i nord", "som ble borte", "over heia", "uten navn", "i mørket", "og landet",
     "mot vest"),
)
NRK_PERSONS: tuple[str, ...] = (
    "Henrik Ibsen", "Knut Hamsun", "Sigrid Undset", "Bjørnstjerne Bjørnson", "Amalie Skram", "Cora Sandel",
    "Tarjei Vesaas", "Jon Fosse", "Olav Duun", "Arne Garborg", "Camilla Collett", "Alexander Kielland",
    "Aasmund Olavsson Vinje", "Halldis Moren Vesaas", "Olav H. Hauge",
)

NRK_COUNT_QUESTIONS: tuple[tuple[Pair, int], ...] = (
    (("Hvor mange spillere har et fotballag på banen samtidig?", "Kor mange spelarar har eit fotballag på bana samstundes?"), 11),
    (("Hvor mange fylker har Norge fra 2024?", "Kor mange fylke har Noreg frå 2024?"), 15),
    (("Hvor mange striper har det amerikanske flagget?", "Kor mange striper har det amerikanske flagget?"), 13),
    (("Hvor mange kommuner har Norge omtrent?", "Kor mange kommunar har Noreg omtrent?"), 357),
    (("Hvor mange medlemmer har Stortinget?", "Kor mange medlemmer har Stortinget?"), 169),
    (("Hvor mange sekunder har en time?", "Kor mange sekund har ein time?"), 3600),
)

NRK_COUNTRIES: tuple[Pair, ...] = (
    ("Norge", "Noreg"), ("Sverige", "Sverige"), ("Finland", "Finland"), ("Danmark", "Danmark"), ("Tyskland", "Tyskland"),
    ("Frankrike", "Frankrike"), ("Italia", "Italia"), ("Spania", "Spania"), ("Nederland", "Nederland"),
    ("Østerrike", "Austerrike"), ("Sveits", "Sveits"), ("Canada", "Canada"),
)
NRK_SPORT_EVENTS: tuple[Pair, ...] = (
    ("flest gullmedaljer i vinter-OL i {year}", "flest gullmedaljar i vinter-OL i {year}"),
    ("herrenes stafett i ski-VM i {year}", "stafetten for herrar i ski-VM i {year}"),
    ("EM i håndball for kvinner i {year}", "EM i handball for kvinner i {year}"),
    ("Eurovision Song Contest i {year}", "Eurovision Song Contest i {year}"),
)

NRK_LEADS: tuple[Pair, ...] = (
    ("", ""), ("", ""), ("", ""), ("", ""),
    ("Vi starter med et lett spørsmål. ", "Vi startar med eit lett spørsmål. "),
    ("Dette spørsmålet handler om Norge. ", "Dette spørsmålet handlar om Noreg. "),
    ("Mange husker dette fra skolen. ", "Mange hugsar dette frå skulen. "),
    ("Nå blir det litt vanskeligere. ", "No blir det litt vanskelegare. "),
    ("Her får du ett poeng for riktig svar. ", "Her får du eitt poeng for rett svar. "),
    ("Neste spørsmål gjelder kultur og samfunn. ", "Neste spørsmål gjeld kultur og samfunn. "),
    ("Lytterne har sendt inn dette spørsmålet. ", "Lyttarane har sendt inn dette spørsmålet. "),
)
