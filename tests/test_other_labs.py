"""Another lab's folder: class folder names as other labs write them, some classes only."""

import os
import zipfile

import pytest

from bcjax import errors
from bcjax.data import layout
from data_fixtures import jpeg_bytes, make_lab_folder


@pytest.mark.parametrize('name, cls', [
    ('neutrophil', 'neutrophil'), ('Neutrophil', 'neutrophil'), ('NEUTROPHILS', 'neutrophil'),
    ('Lymphocytes', 'lymphocyte'), ('eosinophils', 'eosinophil'), ('IG', 'ig'), ('IGs', 'ig'),
    ('Immature granulocytes', 'ig'), ('immature-granulocyte', 'ig'), ('Platelets', 'platelet'),
    ('thrombocytes', 'platelet'), ('Normoblasts', 'erythroblast'),
    ('erythroblasts', 'erythroblast'), ('basophil ', 'basophil'),
])
def test_folder_names_in_any_case_plural_or_alias(name, cls):
  assert layout.class_of_folder(name) == cls


@pytest.mark.parametrize('name', ['lymph', 'eosinophiles', 'band_neutrophil', 'neutrophilss',
                                  'cells', 's', ''])
def test_other_folder_names_are_no_class(name):
  assert layout.class_of_folder(name) is None


def test_a_partial_folder_with_plural_and_uppercase_names_is_read(tmp_path):
  root = make_lab_folder(tmp_path / 'lab', [('NEUTROPHILS', 6), ('Lymphocytes', 4), ('thrombocytes', 7)])
  listing = layout.list_files(layout.locate(root), require_all_classes=False)
  scan = layout.read(listing, require_all_classes=False, threads=1)
  assert sorted({r.file_name.split('/')[0] for r in scan.records}) == [
      'lymphocyte', 'neutrophil', 'platelet']
  assert sorted({r.label for r in scan.records}) == [4, 6, 7]


def test_an_unknown_class_folder_is_one_line_naming_it_and_the_known_names(tmp_path):
  root = make_lab_folder(tmp_path / 'lab', [('neutrophils', 6), ('band cells', 6)])
  with pytest.raises(errors.UserError) as e:
    layout.list_files(layout.locate(root), require_all_classes=False)
  message = str(e.value)
  assert "folder 'band cells' is not a class" in message and '\n' not in message
  assert 'basophil, eosinophil, erythroblast, ig, lymphocyte, monocyte, neutrophil, ' \
         'platelet' in message and 'thrombocyte' in message
  # The same in a zip.
  archive = tmp_path / 'lab.zip'
  with zipfile.ZipFile(archive, 'w') as z:
    z.writestr('lab/Neutrophils/a.jpg', jpeg_bytes(6, 0))
    z.writestr('lab/lymph/b.jpg', jpeg_bytes(4, 0))
  with pytest.raises(errors.UserError, match="folder 'lymph' is not a class"):
    layout.list_files(layout.locate(str(archive)), require_all_classes=False)


def test_a_singular_and_a_plural_folder_of_one_class_are_an_error(tmp_path):
  root = make_lab_folder(tmp_path / 'lab', [('neutrophil', 6), ('Neutrophils', 6)])
  with pytest.raises(errors.UserError, match="both the 'neutrophil' class"):
    layout.list_files(layout.locate(root), require_all_classes=False)


def test_predict_names_the_classes_a_labelled_folder_holds(tmp_path):
  from bcjax import predict
  from bcjax.data.spec import CLASS_NAMES
  root = make_lab_folder(tmp_path / 'lab', [('NEUTROPHILS', 6), ('Thrombocytes', 7)])
  files = predict.expand_paths([root])
  line = predict.folder_classes(files, CLASS_NAMES)
  assert line.startswith("the images' folders name 2 of 8 classes (neutrophil, platelet); "
                         'absent: basophil, eosinophil, erythroblast, ig, lymphocyte, monocyte.')
  os.makedirs(tmp_path / 'lab' / 'patient7')
  with open(tmp_path / 'lab' / 'patient7' / 'x.jpg', 'wb') as f:
    f.write(jpeg_bytes(0, 0))
  assert predict.folder_classes(predict.expand_paths([root]), CLASS_NAMES) == ''
